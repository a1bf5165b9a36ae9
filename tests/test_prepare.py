"""Tests for nanogpt_cli.prepare: splits, exact token streams, pieces, errors, atomic writes."""

import json
import os
import random
import tracemalloc

import numpy as np
import pytest

from nanogpt_cli import prepare as P
from nanogpt_cli.errors import NgptError, UsageError
from nanogpt_cli.prepare import sources, writer
from tests.conftest import needs_bpe, require_module

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex one jolly knight".split()


def make_text(rng: random.Random, n_words: int) -> str:
    """Text with the whitespace patterns that matter to BPE: runs of spaces and blank lines, indents."""
    out = []
    for _ in range(n_words):
        out.append(rng.choice(WORDS))
        out.append(rng.choice([" ", " ", " ", "\n", "\n\n", "  ", ", ", ".\n", "\n  ", "é ", " 12 "]))
    return "".join(out)


def opts(tmp_path, **kwargs) -> P.PrepareOptions:
    return P.PrepareOptions(data_dir=tmp_path / "data", quiet=True, **kwargs)


def load(tmp_path, name):
    folder = tmp_path / "data" / name
    meta = json.loads((folder / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    return meta, {s: np.fromfile(folder / v["file"], dtype=dtype) for s, v in meta["splits"].items()}


@pytest.fixture(scope="module")
def gpt2(bpe_files):
    import tiktoken

    return tiktoken.get_encoding("gpt2")


def test_dtype_for_vocab():
    assert P.dtype_for_vocab(65) == "uint16"
    assert P.dtype_for_vocab(50257) == "uint16"
    assert P.dtype_for_vocab(65535) == "uint16"
    assert P.dtype_for_vocab(100277) == "uint32"  # cl100k_base
    assert P.dtype_for_vocab(200019) == "uint32"  # o200k_base


def test_read_text_chunks_keeps_characters_whole(tmp_path):
    text = "héllo wörld ✓ 𝄞 " * 50
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    for chunk_bytes in (1, 2, 3, 5, 7, 64):
        chunks = list(P.read_text_chunks(path, chunk_bytes=chunk_bytes))
        assert "".join(t for t, _ in chunks) == text
        assert sum(n for _, n in chunks) == len(text.encode())


def test_invalid_utf8_names_file_and_byte(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good text " * 10 + b"\xff\xfe" + b" more")
    with pytest.raises(NgptError, match=r"bad\.txt: invalid UTF-8 at byte 100 .*--errors replace"):
        list(P.read_text_chunks(path, chunk_bytes=7))
    text = "".join(t for t, _ in P.read_text_chunks(path, errors="replace", chunk_bytes=7))
    assert "\ufffd" in text and text.endswith(" more")


@needs_bpe
def test_pieces_tokenize_exactly_like_the_whole(gpt2):
    text = make_text(random.Random(0), 20000)
    whole = gpt2.encode_ordinary(text)
    for size in (120, 257, 4096):  # much smaller windows may hold no safe spot at all
        parts = [t for t, _ in P.pieces([(text, 1.0)], size=size)]
        assert "".join(parts) == text and max(map(len, parts)) <= size
        assert [i for part in parts for i in gpt2.encode_ordinary(part)] == whole


def test_char_single_file_is_split_by_characters(tmp_path):
    text = make_text(random.Random(1), 3000)
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    summary = P.prepare_text([str(tmp_path / "corpus.txt")], opts(tmp_path, tokenizer="char"))
    assert summary["status"] == "prepared" and summary["name"] == "corpus"
    meta, bins = load(tmp_path, "corpus")
    n = int(len(text) * 0.9)
    assert meta["itos"] == sorted(set(text)) and meta["vocab_size"] == len(set(text))
    assert meta["eot_token"] is None and meta["dtype"] == "uint16" and meta["documents"] == 1
    assert meta["splits"]["train"]["tokens"] == n == len(bins["train"])
    decode = "".join
    assert decode(meta["itos"][i] for i in bins["train"]) == text[:n]
    assert decode(meta["itos"][i] for i in bins["val"]) == text[n:]
    for key in ("format", "name", "tokenizer", "source", "fingerprint", "created", "seconds"):
        assert key in meta


@needs_bpe
def test_documents_end_with_eot_and_val_is_deterministic(tmp_path, gpt2, monkeypatch):
    monkeypatch.setattr(writer, "PIECE_CHARS", 300)  # long documents in many pieces, small work units
    monkeypatch.setattr(writer, "UNIT_CHARS", 700)
    rng = random.Random(2)
    docs = [make_text(rng, rng.randint(1, 400)) for _ in range(60)]
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
    P.prepare_text([str(folder)], opts(tmp_path, name="a", val_fraction=0.2, seed=5))
    meta, bins = load(tmp_path, "a")
    expected = sum(len(gpt2.encode_ordinary(d)) + 1 for d in docs)
    assert len(bins["train"]) + len(bins["val"]) == expected
    assert meta["documents"] == 60 and meta["eot_token"] == 50256
    assert bins["train"][-1] == 50256 and bins["val"][-1] == 50256
    # each split is whole documents: decoding at EOTs gives back the documents, in order
    decoded = [gpt2.decode(list(d)) for s in ("train", "val")
               for d in np.split(bins[s], np.flatnonzero(bins[s] == 50256) + 1)[:-1]]
    assert sorted(d[:-len("<|endoftext|>")] for d in decoded) == sorted(docs)
    assert 0 < int((bins["val"] == 50256).sum()) < 30
    P.prepare_text([str(folder)], opts(tmp_path, name="b", val_fraction=0.2, seed=5))
    P.prepare_text([str(folder)], opts(tmp_path, name="c", val_fraction=0.2, seed=6))
    _, same = load(tmp_path, "b")
    _, other = load(tmp_path, "c")
    assert np.array_equal(same["val"], bins["val"]) and not np.array_equal(other["val"], bins["val"])


def test_val_is_never_empty(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"document {i} " * 20)
    P.prepare_text([str(tmp_path / "*.txt")], opts(tmp_path, name="few", tokenizer="char", val_fraction=1e-6))
    meta, bins = load(tmp_path, "few")
    itos = meta["itos"]
    assert "".join(itos[i] for i in bins["val"]) == "document 2 " * 20  # the last document moved to val
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "x" * 100}) + "\n")
    P.prepare_text([str(tmp_path / "one.jsonl")], opts(tmp_path, name="one", tokenizer="char"))
    meta, bins = load(tmp_path, "one")
    assert (len(bins["train"]), len(bins["val"])) == (90, 10)  # one document: its tail


def test_jsonl_and_parquet_documents(tmp_path):
    pa = require_module("pyarrow")
    pq = require_module("pyarrow.parquet")
    lines = [json.dumps({"body": f"line {i}", "id": i}) for i in range(5)] + ["", json.dumps({"body": None})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"body": ["row one", None, "row two"]}), tmp_path / "b.parquet")
    summary = P.prepare_text([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")],
                             opts(tmp_path, name="mixed", tokenizer="char"), text_field="body")
    meta, bins = load(tmp_path, "mixed")
    assert summary["documents"] == meta["documents"] == 7  # blank lines and nulls are no documents
    text = "".join(meta["itos"][i] for s in ("train", "val") for i in bins[s])
    assert sorted(text) == sorted("".join(f"line {i}" for i in range(5)) + "row onerow two")


def test_char_vocabulary_survives_any_character(tmp_path):
    docs = ["emoji 🙂 and é", "lone \ud800 surrogate", "<|endoftext|>"]
    (tmp_path / "u.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    P.prepare_text([str(tmp_path / "u.jsonl")], opts(tmp_path, tokenizer="char"))
    meta, bins = load(tmp_path, "u")
    assert meta["itos"] == sorted(set("".join(docs)))
    assert "".join(meta["itos"][i] for s in ("train", "val") for i in bins[s]) == "".join(docs)


def test_jsonl_errors_name_file_and_line(tmp_path):
    (tmp_path / "missing.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(NgptError, match=r"missing\.jsonl:2: no 'text' field \(found: body\).*--text-field"):
        P.prepare_text([str(tmp_path / "missing.jsonl")], opts(tmp_path, tokenizer="char"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n\n{"text": "unterminated\n')
    with pytest.raises(NgptError, match=r"bad\.jsonl:3: bad JSON"):
        P.prepare_text([str(tmp_path / "bad.jsonl")], opts(tmp_path, tokenizer="char"))
    (tmp_path / "utf.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
    with pytest.raises(NgptError, match=r"utf\.jsonl:2: invalid UTF-8 at byte 25"):
        P.prepare_text([str(tmp_path / "utf.jsonl")], opts(tmp_path, tokenizer="char"))
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file or folder"):
        P.prepare_text([str(tmp_path / "nope.txt")], opts(tmp_path))
    with pytest.raises(UsageError, match="no .txt, .jsonl or .parquet files match"):
        P.prepare_text([str(tmp_path / "*.txt")], opts(tmp_path))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UsageError, match="unsupported file type"):
        P.prepare_text([str(tmp_path / "x.csv")], opts(tmp_path))
    (tmp_path / "ok.txt").write_text("some text")
    with pytest.raises(UsageError, match="unknown tokenizer 'nope'"):
        P.prepare_text([str(tmp_path / "ok.txt")], opts(tmp_path, tokenizer="nope"))
    with pytest.raises(UsageError, match="val-fraction"):
        P.prepare_text([str(tmp_path / "ok.txt")], opts(tmp_path, val_fraction=0))
    with pytest.raises(UsageError, match="invalid dataset name"):
        P.prepare_text([str(tmp_path / "ok.txt")], opts(tmp_path, name="../up"))
    with pytest.raises(UsageError, match="is a folder"):
        P.prepare_shakespeare_char(opts(tmp_path), source=str(tmp_path))


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_empty_corpus(tmp_path, tokenizer, request):
    if tokenizer == "gpt2":
        request.getfixturevalue("bpe_files")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(NgptError, match="empty corpus"):
        P.prepare_text([str(tmp_path / "empty.txt"), str(tmp_path / "blank.jsonl")],
                       opts(tmp_path, tokenizer=tokenizer))
    assert not any((tmp_path / "data").iterdir())  # no temporary folder left behind


def test_up_to_date_until_sources_or_options_change(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world, " * 100)
    first = P.prepare_text([str(path)], opts(tmp_path, tokenizer="char"))
    assert first["status"] == "prepared"
    assert P.prepare_text([str(path)], opts(tmp_path, tokenizer="char"))["status"] == "up to date"
    assert P.prepare_text([str(path)], opts(tmp_path, tokenizer="char", force=True))["status"] == "prepared"
    assert P.prepare_text([str(path)], opts(tmp_path, tokenizer="char", val_fraction=0.2))["status"] == "prepared"
    path.write_text("hello there, " * 100)
    assert P.prepare_text([str(path)], opts(tmp_path, tokenizer="char", val_fraction=0.2))["status"] == "prepared"
    meta, _ = load(tmp_path, "t")
    (tmp_path / "data" / "t" / "val.bin").write_bytes(b"")  # damaged files are rebuilt
    assert P.prepare_text([str(path)], opts(tmp_path, tokenizer="char", val_fraction=0.2))["status"] == "prepared"


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_failures_leave_the_previous_dataset_intact(tmp_path, monkeypatch):
    good = tmp_path / "good.txt"
    good.write_text("a perfectly good corpus. " * 200)
    P.prepare_text([str(good)], opts(tmp_path, name="ds", tokenizer="char"))
    before = _snapshot(tmp_path / "data" / "ds")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"x" * 5000 + b"\xff")
    with pytest.raises(NgptError, match="invalid UTF-8"):
        P.prepare_text([str(good), str(bad)], opts(tmp_path, name="ds", tokenizer="char", force=True))

    calls = {"n": 0}
    real = writer._make_encoder

    def interrupting(tokenizer, dtype):  # Ctrl-C in the middle of tokenizing
        encode = real(tokenizer, dtype)

        def wrapped(text):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return encode(text)

        return wrapped

    monkeypatch.setattr(writer, "_make_encoder", interrupting)
    monkeypatch.setattr(writer, "PIECE_CHARS", 500)
    monkeypatch.setattr(writer, "UNIT_CHARS", 500)
    with pytest.raises(KeyboardInterrupt):
        P.prepare_text([str(good)], opts(tmp_path, name="ds", tokenizer="char", force=True))
    assert calls["n"] >= 3
    assert _snapshot(tmp_path / "data" / "ds") == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ds"]  # no temporary folders


@needs_bpe
def test_special_token_text_and_lone_surrogates_are_plain_text(tmp_path, gpt2):
    docs = ["say <|endoftext|> twice <|endoftext|>", "lone \ud800 surrogate"]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    P.prepare_text([str(tmp_path / "s.jsonl")], opts(tmp_path, name="s", val_fraction=0.5))
    _, bins = load(tmp_path, "s")
    tokens = np.concatenate([bins["train"], bins["val"]]).tolist()
    expected = gpt2.encode_ordinary(docs[0]) + [50256] + gpt2.encode_ordinary("lone \ufffd surrogate") + [50256]
    assert tokens == expected


@needs_bpe
def test_large_vocab_is_written_as_uint32(tmp_path, monkeypatch, gpt2):
    from nanogpt_cli.tokenizer import TiktokenTokenizer

    big = TiktokenTokenizer("gpt2")
    big.vocab_size = 100277  # stands in for cl100k_base, whose BPE files cannot be downloaded here
    monkeypatch.setattr(writer, "get_tokenizer", lambda name: big)
    docs = [f"document {i}: " + "words and more words " * i for i in range(1, 20)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    P.prepare_text([str(tmp_path / "d.jsonl")], opts(tmp_path, name="big"))
    meta, bins = load(tmp_path, "big")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 100277
    n = sum(len(gpt2.encode_ordinary(d)) + 1 for d in docs)
    assert len(bins["train"]) + len(bins["val"]) == n
    size = sum((tmp_path / "data" / "big" / f).stat().st_size for f in ("train.bin", "val.bin"))
    assert size == 4 * n


@needs_bpe
def test_a_large_file_is_read_in_pieces(tmp_path, monkeypatch):
    """Memory stays flat: one big text file never sits in memory whole, nor do its tokens."""
    monkeypatch.setattr(sources, "READ_BYTES", 1 << 14)
    monkeypatch.setattr(writer, "PIECE_CHARS", 1 << 15)
    monkeypatch.setattr(writer, "UNIT_CHARS", 1 << 15)
    block = make_text(random.Random(3), 20000)
    path = tmp_path / "big.txt"
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < 3_000_000:
            f.write(block)
    writer.get_tokenizer("gpt2")  # load the BPE ranks before measuring
    tracemalloc.start()
    try:
        summary = P.prepare_text([str(path)], opts(tmp_path, num_threads=2))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary["train_tokens"] > 500_000
    assert peak < 8_000_000, peak  # whole: 3 MB of text plus ~30 MB of token lists


def test_download_caches_and_failure_says_what_to_do(tmp_path, monkeypatch):
    import http.server
    import threading

    monkeypatch.setenv("NGPT_CACHE_DIR", str(tmp_path / "cache"))
    served = tmp_path / "site"
    served.mkdir()
    (served / "input.txt").write_text("To be, or not to be, that is the question. " * 50)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/input.txt"
        summary = P.prepare_shakespeare_char(opts(tmp_path), source=url)
    finally:
        server.shutdown()
    assert summary["train_tokens"] == int(len("To be, or not to be, that is the question. ") * 50 * 0.9)
    assert len(list((tmp_path / "cache" / "downloads").iterdir())) == 1
    with pytest.raises(NgptError, match=r"could not download .*--source PATH"):
        P.prepare_shakespeare_char(opts(tmp_path, name="x"), source="http://127.0.0.1:9/input.txt")
    assert not (tmp_path / "data" / "x").exists()


def test_list_and_info(tmp_path):
    (tmp_path / "a.txt").write_text("abc def " * 50)
    P.prepare_text([str(tmp_path / "a.txt")], opts(tmp_path, tokenizer="char"))
    (tmp_path / "data" / "not_a_dataset").mkdir()
    rows = P.list_datasets(tmp_path / "data")
    assert [r["name"] for r in rows] == ["a"]
    assert rows[0]["tokens"] == {"train": 360, "val": 40} and rows[0]["bytes"] > 800
    info = P.dataset_info("a", tmp_path / "data")
    assert info["itos"] == [" ", "a", "b", "c", "d", "e", "f"] and info["complete"]
    with pytest.raises(UsageError, match="no dataset 'b'.*datasets: a"):
        P.dataset_info("b", tmp_path / "data")
    assert P.list_datasets(tmp_path / "nowhere") == []


def test_default_name():
    assert P.default_name("data/books/") == "books"
    assert P.default_name("corpus/*.jsonl") == "corpus"
    assert P.default_name("input.txt") == "input"
    assert P.default_name("roneneldan/TinyStories") == "TinyStories"
    assert P.default_name("**/*.txt") == "text"


# --- Hugging Face datasets (optional extra) ------------------------------------------------------


@pytest.fixture
def hf_datasets(tmp_path, monkeypatch):
    datasets = require_module("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    datasets.disable_progress_bars()
    return datasets


@needs_bpe
def test_openwebtext_recipe_on_a_local_dataset(tmp_path, hf_datasets, gpt2):
    rng = random.Random(4)
    docs = [make_text(rng, rng.randint(5, 60)) for _ in range(3000)]
    saved = tmp_path / "owt"
    hf_datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(saved))
    summary = P.prepare_openwebtext(opts(tmp_path), dataset_id=str(saved))
    meta, bins = load(tmp_path, "openwebtext")
    assert sorted(p.name for p in saved.iterdir()) == ["data-00000-of-00001.arrow", "dataset_info.json",
                                                       "state.json"]  # nothing written next to the data
    # nanoGPT's split of the same dataset: 2 val documents (ceil(3000 * 0.0005)), in shuffled order
    split = hf_datasets.load_from_disk(str(saved)).train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    for ours, theirs in (("train", "train"), ("val", "test")):
        expected = [t for d in split[theirs]["text"] for t in gpt2.encode_ordinary(d) + [50256]]
        assert bins[ours].tolist() == expected
    assert meta["documents"] == summary["documents"] == 3000 and meta["dtype"] == "uint16"
    # the same code path from local parquet files
    pq = require_module("pyarrow.parquet")
    pq.write_table(hf_datasets.Dataset.from_dict({"text": docs}).data.table, tmp_path / "owt.parquet")
    P.prepare_openwebtext(opts(tmp_path, name="owt_parquet"), data_files=[str(tmp_path / "*.parquet")])
    _, again = load(tmp_path, "owt_parquet")
    assert np.array_equal(again["val"], bins["val"]) and np.array_equal(again["train"], bins["train"])


def test_hf_saved_folder_and_data_files(tmp_path, hf_datasets):
    docs = [f"story {i}: " + "once upon a time " * (i % 5 + 1) for i in range(30)]
    saved = tmp_path / "saved"
    hf_datasets.DatasetDict({"train": hf_datasets.Dataset.from_dict({"content": docs}),
                             "validation": hf_datasets.Dataset.from_dict({"content": docs[:4]})}).save_to_disk(saved)
    s = P.prepare_hf(str(saved), opts(tmp_path, tokenizer="char"), text_field="content")
    assert s["name"] == "saved" and s["documents"] == 30 and s["val_tokens"] > 0
    s = P.prepare_hf(str(saved), opts(tmp_path, name="v", tokenizer="char"), split="validation", text_field="content")
    assert s["documents"] == 4
    with pytest.raises(UsageError, match="no split 'test'.*--split"):
        P.prepare_hf(str(saved), opts(tmp_path, name="t", tokenizer="char"), split="test", text_field="content")
    with pytest.raises(NgptError, match="no 'text' column.*content"):
        P.prepare_hf(str(saved), opts(tmp_path, name="t", tokenizer="char"))
    files = tmp_path / "files"
    files.mkdir()
    (files / "part.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    s = P.prepare_hf(str(files), opts(tmp_path, tokenizer="char"))  # streamed
    assert s["name"] == "files" and s["documents"] == 30


def test_hf_hub_without_network(tmp_path, hf_datasets, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(NgptError, match="could not load 'nobody/nothing'.*local folder"):
        P.prepare_hf("nobody/nothing", opts(tmp_path, tokenizer="char"))
    with pytest.raises(UsageError, match="is a file"):
        (tmp_path / "f.txt").write_text("x")
        P.prepare_hf(str(tmp_path / "f.txt"), opts(tmp_path))


@pytest.mark.parametrize("args, hint", [
    (["hf", "nobody/nothing"], "pass a local folder"),
    (["openwebtext"], "pass --dataset-id FOLDER .* or --data-files FILES"),
])
def test_hub_unreachable_is_one_line_without_retry_warnings(tmp_path, args, hint):
    """No network (a Hub that refuses connections): the command says at once, in one line, to use local data.
    The Hub's host is probed first, so the Hub client never waits between retries (a wait fails this test)."""
    import re
    import subprocess
    import sys

    require_module("datasets")
    child = ("import sys, time\n"
             "def no_retries(seconds): raise SystemExit('the Hub client retried')\n"
             "time.sleep = no_retries\n"
             "from nanogpt_cli.cli_data import prepare_app\n"
             "prepare_app(sys.argv[1:], prog_name='ngpt prepare')")
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf"), "NGPT_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run([sys.executable, "-c", child, *args, "--tokenizer", "char"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not load"), done.stderr
    assert re.search(f"without network, {hint}", lines[0]), lines[0]
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())
