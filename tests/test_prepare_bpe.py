"""`ngpt prepare ... --tokenizer bpe:N`: a byte-level BPE trained on the corpus (Hugging Face `tokenizers`),
stored with the dataset and reused by name; its bad input; and a trained-BPE dataset through train, resume,
sample and eval."""

from __future__ import annotations

import _thread
import json
import random
import threading
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from nanogpt_cli import prepare as P
from nanogpt_cli.cli import app
from nanogpt_cli.data import load_meta
from nanogpt_cli.errors import NgptError, UsageError
from nanogpt_cli.prepare import bpe
from nanogpt_cli.tokenizer import EOT_TEXT, BPETokenizer, from_meta
from tests.conftest import TINY, require_module

tokenizers = require_module("tokenizers")
runner = CliRunner()


def ngpt(*args: str, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def one_error_line(result) -> str:
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare):
    """The first 200 KB of Tiny Shakespeare as one .txt file."""
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(shakespeare.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus):
    """`ngpt prepare text plays.txt --tokenizer bpe:512`: (data_dir, the dataset's folder)."""
    data_dir = tmp_path_factory.mktemp("data")
    ngpt("prepare", "text", corpus, "--tokenizer", "bpe:512", "--data-dir", data_dir, "--quiet")
    return data_dir, data_dir / "plays"


def random_text(rng: random.Random, n: int) -> str:
    """Any characters at all: ASCII, accents, CJK, emoji, astral planes, controls and whitespace runs."""
    pools = ["abcdefghij klmnop", "  \n\n\t\r", "éüßñçøå", "日本語中文한국어", "🤖🎉👍🏽", "0123456789'.,!?-",
             "".join(chr(rng.randrange(0x80, 0x2FFFF)) for _ in range(64))]
    chars = [rng.choice(rng.choice(pools)) for _ in range(n)]
    return "".join(c for c in chars if not 0xD800 <= ord(c) <= 0xDFFF)


def test_the_dataset_keeps_its_tokenizer_named_and_fingerprinted(prepared, corpus):
    data_dir, folder = prepared
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"], meta["dtype"]) == ("bpe", 512, 511, "uint16")
    assert meta["tokenizer_file"] == "tokenizer.json" and "tokenizer_json" not in meta  # the file, not a copy
    text = (folder / "tokenizer.json").read_text(encoding="utf-8")
    tok = BPETokenizer(text)
    assert tok.sha256 == meta["tokenizer_sha256"] and tok.vocab_size == 512
    assert load_meta(folder)["tokenizer_json"] == text  # what a checkpoint carries
    # the bins are the tokenizer's encoding of the text: 90% train by characters, EOT at the document's end
    source = corpus.read_text(encoding="utf-8")
    cut = int(len(source) * 0.9)
    bins = {s: np.fromfile(folder / f"{s}.bin", dtype=np.uint16).tolist() for s in ("train", "val")}
    assert bins["train"] == tok.encode(source[:cut]) and bins["val"] == tok.encode(source[cut:]) + [511]


def test_round_trip_of_any_unicode_and_tokenizers_agree(prepared):
    tok = from_meta(load_meta(prepared[1]))
    reference = tokenizers.Tokenizer.from_str(tok.json)
    rng = random.Random(0)
    lengths = tok.token_byte_lengths()
    for _ in range(200):
        text = random_text(rng, rng.randrange(1, 200))
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert b"".join(tok.enc.decode_single_token_bytes(i) for i in ids) == text.encode()
        assert sum(lengths[i] for i in ids) == len(text.encode())
        assert reference.encode(text, add_special_tokens=False).ids == ids  # what transformers will give


def test_special_token_is_last_and_its_text_is_plain_text(prepared):
    tok = from_meta(load_meta(prepared[1]))
    assert tok.eot_token == tok.vocab_size - 1 and tok.decode([tok.eot_token]) == EOT_TEXT
    assert tok.eot_token not in tok.encode(f"the end{EOT_TEXT}the start")


def test_same_corpus_and_size_give_the_same_merges(corpus, prepared):
    texts = [corpus.read_text(encoding="utf-8")[:180_000]]
    again = bpe.train_bpe(iter(texts), 512, "plays")
    assert again.json == (prepared[1] / "tokenizer.json").read_text(encoding="utf-8")  # the train split, alike
    assert bpe.train_bpe(iter(texts), 400, "plays").json != again.json


def test_the_tokenizer_never_sees_val(tmp_path):
    """One document: the last 10% of its characters are val, and a word that occurs only there stays in pieces."""
    text = "to be or not to be, that is the question.\n" * 400
    path = tmp_path / "a.txt"
    path.write_text(text + "xyzzyplugh " * 300, encoding="utf-8")
    summary = P.prepare_text([str(path)], P.PrepareOptions(data_dir=tmp_path, tokenizer="bpe:281", quiet=True,
                                                           val_fraction=0.17))
    tok = from_meta(load_meta(tmp_path / summary["name"]))
    assert len(tok.encode(" question")) == 1 and len(tok.encode(" xyzzyplugh")) > 3


def test_a_sample_trains_on_the_first_bytes_only(tmp_path, corpus):
    opts = P.PrepareOptions(data_dir=tmp_path, tokenizer="bpe:2000", tokenizer_sample=5_000, quiet=True)
    with pytest.raises(NgptError, match=r"first 5,000 bytes .*allows \d+ merges, not 1743"):
        P.prepare_text([str(corpus)], opts)
    opts.tokenizer = "bpe:300"
    P.prepare_text([str(corpus)], opts)
    sampled = from_meta(load_meta(tmp_path / "plays"))
    assert sampled.json == bpe.train_bpe(iter([corpus.read_text(encoding="utf-8")[:5_000]]), 300, "x").json


def test_a_tokenizer_file_or_dataset_folder_is_reused(tmp_path, prepared, corpus):
    data_dir, folder = prepared
    other = tmp_path / "other.txt"
    other.write_text("Now is the winter of our discontent.\n" * 200, encoding="utf-8")
    for spec, name in ((folder / "tokenizer.json", "by_file"), (folder, "by_folder")):
        ngpt("prepare", "text", other, "--tokenizer", spec, "--data-dir", data_dir, "--name", name, "--quiet")
        assert (data_dir / name / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
        meta = load_meta(data_dir / name)
        assert meta["tokenizer_sha256"] == load_meta(folder)["tokenizer_sha256"]
    # Hugging Face's own layout (<|endoftext|> first, merges as pairs) is put in ngpt's, the same tokenizer
    trained = tokenizers.Tokenizer(tokenizers.models.BPE())
    trained.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator([corpus.read_text(encoding="utf-8")[:180_000]], tokenizers.trainers.BpeTrainer(
        vocab_size=512, special_tokens=[EOT_TEXT], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    trained.save(str(tmp_path / "hf.json"))
    assert bpe.read_tokenizer_file(tmp_path / "hf.json").json == (folder / "tokenizer.json").read_text("utf-8")


def test_bad_sizes_are_usage_errors():
    assert bpe.parse_bpe_spec("gpt2") is None and bpe.parse_bpe_spec("bpe:257") == 257
    assert bpe.parse_bpe_spec("bpe:32_768") == 32768
    for spec, reason in (("bpe:256", "at least 257 tokens"), (f"bpe:{2**32 + 1}", "at most 2\\^32"),
                         ("bpe", "whole number"), ("bpe:2k", "whole number")):
        with pytest.raises(UsageError, match=reason):
            bpe.parse_bpe_spec(spec)
    assert [bpe.parse_byte_size(s) for s in ("500", "100MB", "1.5GB", "2MiB")] == [500, 10**8, 15 * 10**8, 2**21]
    for text in ("lots", "10 parsecs", "0"):
        with pytest.raises(UsageError, match="give a size in bytes"):
            bpe.parse_byte_size(text)


def test_bad_input_is_one_error_line_and_the_dataset_is_kept(tmp_path, corpus):
    data = tmp_path / "data"
    ngpt("prepare", "text", corpus, "--tokenizer", "bpe:300", "--data-dir", data, "--quiet")
    again = ngpt("prepare", "text", corpus, "--tokenizer", "bpe:300", "--data-dir", data, "--quiet")
    assert "up to date" in again.stdout  # the same corpus, N and sample: nothing to do
    before = {p.name: p.read_bytes() for p in (data / "plays").iterdir()}
    garbage, wordlevel = tmp_path / "garbage.json", tmp_path / "wordlevel.json"
    garbage.write_text("{ this is not json")
    tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0}, unk_token="a")).save(str(wordlevel))
    cases = [(["--tokenizer", "bpe:100"], 2, "at least 257 tokens"),
             (["--tokenizer", f"bpe:{2**33}"], 2, "at most 2^32"),
             (["--tokenizer", "bpe:100000"], 1, "too little text for bpe:100000: it allows"),
             (["--tokenizer", garbage], 2, "does not parse as JSON"),
             (["--tokenizer", wordlevel], 2, "its model is 'WordLevel', not BPE"),
             (["--tokenizer", tmp_path / "nothing.json"], 2, "no such file"),
             (["--tokenizer", "gpt2", "--tokenizer-sample", "1MB"], 2, "--tokenizer-sample is the training text"),
             (["--tokenizer", "bpe:300", "--tokenizer-sample", "a lot"], 2, "give a size in bytes")]
    for args, code, message in cases:
        result = ngpt("prepare", "text", corpus, *args, "--data-dir", data, "--force", "--quiet", code=code)
        assert message in one_error_line(result), (args, result.stderr)
    bad = tmp_path / "bad" / "plays.txt"  # an error met while the trainer reads (in its own thread)
    bad.parent.mkdir()
    bad.write_bytes(b"to be or not " * 1000 + b"\xff")
    result = ngpt("prepare", "text", bad, "--tokenizer", "bpe:300", "--data-dir", data, "--force", "--quiet", code=2)
    assert "invalid UTF-8 at byte 13000" in one_error_line(result)
    assert {p.name: p.read_bytes() for p in (data / "plays").iterdir()} == before
    assert not [p for p in data.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_ctrl_c_interrupts_training_at_once():
    """Rust code holds the trainer's thread: the main thread, waiting in short joins, still sees Ctrl-C."""
    threading.Timer(0.2, _thread.interrupt_main).start()
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        bpe.interruptible(lambda: time.sleep(5))
    assert time.perf_counter() - start < 2


def test_a_trained_bpe_dataset_trains_resumes_samples_and_evaluates(tmp_path, prepared):
    data_dir, folder = prepared
    out = tmp_path / "out"
    args = [*TINY, "--dataset=plays", f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_interval=2"]
    ngpt("train", *args, "--max_iters=2")
    ngpt("train", *args, "--max_iters=4", "--init_from=resume")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 2, 4] and all(0 < r["val_bpb"] < 20 for r in evals)
    report = json.loads(ngpt("eval", f"--out_dir={out}", "--eval_iters=2", "--batch_size=2", "--device=cpu",
                             "--json").stdout)
    assert report["dataset"] == "plays" and report["val_bpb"] > 0

    moved = tmp_path / "moved"
    folder.rename(moved)  # the checkpoint carries its tokenizer: sampling needs no dataset
    try:
        sample = ngpt("sample", "--out-dir", out, "--prompt", "ROMEO: naïve", "--max-new-tokens", "8", "--json")
    finally:
        moved.rename(folder)
    assert json.loads(sample.stdout)["samples"][0].startswith("ROMEO: naïve")


def test_a_checkpoint_refuses_a_dataset_whose_tokenizer_changed(tmp_path, corpus):
    data_dir, out = tmp_path / "data", tmp_path / "out"
    ngpt("prepare", "text", corpus, "--tokenizer", "bpe:300", "--data-dir", data_dir, "--quiet")
    args = [*TINY, "--dataset=plays", f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_interval=2"]
    ngpt("train", *args, "--max_iters=2")
    ngpt("prepare", "text", corpus, "--tokenizer", "bpe:320", "--data-dir", data_dir, "--quiet", "--force")
    result = ngpt("train", *args, "--max_iters=4", "--init_from=resume", code=2)
    assert "another BPE tokenizer" in one_error_line(result)
    result = ngpt("eval", f"--out_dir={out}", "--device=cpu", "--eval_iters=1", code=2)
    assert "another BPE tokenizer" in one_error_line(result)

    tokenizer_file = data_dir / "plays" / "tokenizer.json"  # edited after preparing: the bins are not its tokens
    tokenizer_file.write_text(tokenizer_file.read_text(encoding="utf-8").replace('"ignore_merges": true',
                                                                                '"ignore_merges": false'))
    result = ngpt("train", *TINY, "--dataset=plays", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'new'}",
                  code=1)
    assert "changed since the dataset was prepared" in one_error_line(result)
