"""Zero-shot HellaSwag and LAMBADA: readers, downloads, the scorer against hand-computed and
transformers-computed log-likelihoods, and `ngpt eval --task ...` through the CLI."""

from __future__ import annotations

import io
import json
import math
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nanogpt_cli import zeroshot
from nanogpt_cli.cli import app
from nanogpt_cli.errors import NgptError, UsageError
from nanogpt_cli.model import GPTConfig
from tests.conftest import require_module

runner = CliRunner()
CPU = torch.device("cpu")

# Items in the files' own formats (the first is hellaswag_val.jsonl's first line).
HELLASWAG = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell. She bends down and grabs "
     "the pole.", "ctx_b": "the lady", "ctx": "A lady walks to a barbell. She bends down and grabs the pole. the lady",
     "split": "val", "split_type": "zeroshot", "label": 3,
     "endings": ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.",
                 "stands and lifts the weight over her head."], "source_id": "activitynet~v_-lJS58hyo1c"},
    {"ind": 7, "activity_label": "Baking cookies", "ctx_a": " ".join(["The dough is rolled out flat and thin."] * 12),
     "ctx_b": "a woman", "ctx": " ".join(["The dough is rolled out flat and thin."] * 12) + " a woman",  # > 64 tokens
     "split": "val", "split_type": "indomain", "label": 0,
     "endings": ["cuts shapes out of the dough.", "eats.", "throws the rolling pin across the kitchen and leaves.",
                 "sings."], "source_id": "activitynet~v_test"},
]
LAMBADA = [
    {"text": "In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel. \"Figured if "
             "you're going to be out at night getting hit by cars, you might as well have some backup.\" I look at "
             "him, feeling stunned. Like this is some sort of sign. But as I stare at Harlin, his mouth curved in a "
             "confident grin, I don't care about signs"},
    {"text": "Give me a minute to change and I'll meet you at the docks.\" She'd forced those words through her "
             "teeth. \"No need to change. We won't be that long.\" Shane gripped her arm and started leading her to "
             "the dock"},
    {"text": "the cat sat on the mat and then the cat"},
]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def ngpt(*args: str, code: int = 0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def one_line_error(result, *parts: str) -> str:
    """The error is one line, the last on stderr (a log line such as "downloading ..." may come before it)."""
    lines = result.stderr.strip().splitlines()
    err = lines[-1] if lines else ""
    assert err.startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for part in parts:
        assert part in err, err
    return err


@pytest.fixture
def tiktoken_gpt2(bpe_files):
    import tiktoken

    return tiktoken.get_encoding("gpt2")


# ---------------------------------------------------------------------------------------------
# Models and tokenizers whose log-likelihoods are known by hand.


class Unigram(torch.nn.Module):
    """Every position predicts the same distribution, whatever the context."""

    def __init__(self, logits: list[float], block_size: int = 64):
        super().__init__()
        self.config = GPTConfig(block_size=block_size, vocab_size=len(logits), n_layer=1, n_head=1, n_embd=8)
        self.logits = torch.tensor(logits)

    def forward(self, idx, targets=None, all_logits=False):
        assert all_logits and idx.size(1) <= self.config.block_size
        return self.logits.expand(*idx.shape, -1).clone(), None


class Successor(torch.nn.Module):
    """Predicts token t + 1 after token t, with logit 10 (0 for every other token)."""

    def __init__(self, vocab_size: int = 16):
        super().__init__()
        self.config = GPTConfig(block_size=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_embd=8)

    def forward(self, idx, targets=None, all_logits=False):
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        return logits.scatter_(2, ((idx + 1) % self.config.vocab_size)[..., None], 10.0), None


class WordTokenizer:
    """One token per word (or per part of a word joined with '_'): its index in `vocab`."""

    eot_token = 0

    def __init__(self, vocab: list[str]):
        self.vocab = vocab

    def encode(self, text: str) -> list[int]:
        return [self.vocab.index(w) for w in text.replace("_", " ").split()]


VOCAB = ["<eot>", "ctx", "x", "y", "o", "pad1", "pad2", "pad3"]
LOGITS = [0.0, 0.0, 4.0, 2.0, 0.0, 0.0, 0.0, 0.0]


def test_hellaswag_acc_and_acc_norm_by_hand():
    L = math.log(math.exp(4) + math.exp(2) + 6)  # log-partition: logp(x) = 4 - L, logp(y) = 2 - L, logp(o) = -L
    item = zeroshot.HellaSwagItem("ctx ctx", ["o", "y y y", "o o", "y o"], label=1)
    scored = zeroshot.score(Unigram(LOGITS), [zeroshot.fit_window([1, 1], WordTokenizer(VOCAB).encode(" " + e), 64, 0)
                                              for e in item.endings], CPU, "float32")
    expected = [[-L], [2 - L] * 3, [-L, -L], [2 - L, -L]]
    for s, want in zip(scored, expected, strict=True):
        assert s.logprobs == pytest.approx(want, abs=1e-5)
    # sums: -L > 2 - 2L > 6 - 3L > -2L picks "o"; means: 2 - L is the best per token, picks "y y y"
    items = [item,
             zeroshot.HellaSwagItem("ctx", ["x", "o", "y", "o o"], label=0),  # both right
             zeroshot.HellaSwagItem("ctx", ["o", "y y y", "o o", "y o"], label=2)]  # both wrong
    for batch_size in (1, 4, 16):  # one item per forward, and all three in one padded forward
        result = zeroshot.eval_hellaswag(Unigram(LOGITS), WordTokenizer(VOCAB), items, CPU, "float32", 64, batch_size)
        assert result == {"examples": 3, "accuracy": 1 / 3, "accuracy_norm": 2 / 3, "correct": 1, "correct_norm": 2}


def test_lambada_greedy_match_of_every_target_token():
    hi = 10 - math.log(math.exp(10) + 15)  # logp of the predicted token (vocab 16)
    lo = -math.log(math.exp(10) + 15)  # logp of any other
    numbers = WordTokenizer([str(i) for i in range(16)])
    items = [zeroshot.LambadaItem("1 2 3 4", "5_6"),  # both tokens predicted: correct
             zeroshot.LambadaItem("7 8", "9_11"),  # first token right, second wrong: incorrect
             zeroshot.LambadaItem("2 3", "9"),  # wrong
             zeroshot.LambadaItem("3", "4")]  # right
    for batch_size in (1, 3, 16):
        result = zeroshot.eval_lambada(Successor(), numbers, items, CPU, "float32", 64, batch_size)
        assert result["examples"] == 4 and result["correct"] == 2 and result["accuracy"] == 0.5
        mean = (2 * hi + (hi + lo) + lo + hi) / 4
        assert result["mean_logprob"] == pytest.approx(mean, abs=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(-mean), rel=1e-5)


def test_fit_window_keeps_the_last_block_size_tokens():
    assert zeroshot.fit_window([1, 2, 3], [4, 5], 64, 0) == ([1, 2, 3, 4, 5], 2)
    assert zeroshot.fit_window([1, 2, 3, 4, 5, 6], [7, 8], 4, 0) == ([5, 6, 7, 8], 2)
    assert zeroshot.fit_window([1, 2], [3, 4, 5, 6], 3, 0) == ([4, 5, 6], 2)  # the ending itself overflows
    assert zeroshot.fit_window([], [3, 4], 64, 0) == ([0, 3, 4], 2)  # an empty context starts at <|endoftext|>


# ---------------------------------------------------------------------------------------------
# Against transformers: a tiny GPT-2 with GPT-2's vocabulary, saved as a Hugging Face folder.


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    transformers = require_module("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     initializer_range=0.2)  # peakier than GPT-2's 0.02: no near-ties
    model = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(hf_folder):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(hf_folder).eval()


def reference_logprobs(hf_model, tokens: list[int], n: int) -> list[float]:
    """log p of the last n tokens, from transformers' own forward on the unpadded sequence."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([tokens])).logits[0].float()
    logp = logits.log_softmax(-1)
    return [logp[t - 1, tokens[t]].item() for t in range(len(tokens) - n, len(tokens))]


def test_padded_batch_scores_match_transformers(hf_folder, reference):
    from nanogpt_cli.checkpoint import load_model

    model, meta, _ = load_model(str(hf_folder), "unused")
    assert meta["tokenizer"] == "gpt2"
    g = torch.Generator().manual_seed(1)
    rows = [(torch.randint(0, 50257, (length,), generator=g).tolist(), n) for length, n in
            ((5, 2), (64, 10), (17, 1), (30, 29))]  # lengths differ: the short rows are padded
    greedy = torch.randint(0, 50257, (6,), generator=g).tolist()
    with torch.no_grad():
        for _ in range(3):  # continue with transformers' own argmax: a continuation greedy decoding reproduces
            greedy.append(reference(torch.tensor([greedy])).logits[0, -1].argmax().item())
    rows += [(greedy, 3), (greedy[:-1] + [(greedy[-1] + 1) % 50257], 3)]  # and one whose last token is not
    scored = zeroshot.score(model.eval(), rows, CPU, "float32")
    for (tokens, n), s in zip(rows, scored, strict=True):
        want = reference_logprobs(reference, tokens, n)
        assert s.logprobs == pytest.approx(want, abs=1e-4)
        with torch.no_grad():
            argmax = reference(torch.tensor([tokens])).logits[0].argmax(-1)
        assert s.greedy == all(argmax[t - 1].item() == tokens[t] for t in range(len(tokens) - n, len(tokens)))
    assert [s.greedy for s in scored[-2:]] == [True, False]


def expected_hellaswag(reference, enc, items, block_size=64) -> tuple[float, float]:
    """karpathy's hellaswag.py, computed with transformers: ctx tokens + (" " + ending) tokens."""
    correct = correct_norm = 0
    for item in items:
        sums, means = [], []
        for ending in item["endings"]:
            ctx, end = enc.encode(item["ctx"]), enc.encode(" " + ending)
            tokens = (ctx + end)[-block_size:]
            lp = reference_logprobs(reference, tokens, min(len(end), len(tokens) - 1))
            sums.append(sum(lp))
            means.append(sum(lp) / len(lp))
        correct += int(np.argmax(sums)) == item["label"]
        correct_norm += int(np.argmax(means)) == item["label"]
    return correct / len(items), correct_norm / len(items)


def expected_lambada(reference, enc, lines, block_size=64) -> tuple[float, float]:
    correct, total = 0, 0.0
    for line in lines:
        context, word = line["text"].rsplit(" ", 1)
        tokens = (enc.encode(context) + enc.encode(" " + word))[-block_size:]
        n = len(enc.encode(" " + word))
        lp = reference_logprobs(reference, tokens, n)
        with torch.no_grad():
            argmax = reference(torch.tensor([tokens])).logits[0].argmax(-1)
        correct += all(argmax[t - 1].item() == tokens[t] for t in range(len(tokens) - n, len(tokens)))
        total += sum(lp)
    return correct / len(lines), total / len(lines)


@pytest.fixture
def files(tmp_path):
    return write_jsonl(tmp_path / "hellaswag_val.jsonl", HELLASWAG), write_jsonl(tmp_path / "lambada_test.jsonl",
                                                                                 LAMBADA)


def save_ngpt_checkpoint(model, out_dir, meta) -> str:
    from nanogpt_cli.checkpoint import CKPT_NAME, FORMAT, atomic_save

    out_dir.mkdir(parents=True, exist_ok=True)
    keys = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
    atomic_save({"format": FORMAT, "model": model.state_dict(), "model_args": {k: getattr(model.config, k)
                 for k in keys}, "config": {}, "meta": meta, "iter_num": 0, "best_val_loss": float("inf")},
                out_dir / CKPT_NAME)
    return str(out_dir)


def test_cli_json_matches_transformers_for_checkpoint_and_hf_folder(tmp_path, monkeypatch, hf_folder, reference,
                                                                   files, tiktoken_gpt2):
    from nanogpt_cli.checkpoint import load_model

    monkeypatch.setenv("NGPT_DATA_DIR", str(tmp_path / "no-data"))  # no openwebtext: the tasks must not need it
    hellaswag, lambada = files
    model, meta, _ = load_model(str(hf_folder), "unused")
    out_dir = save_ngpt_checkpoint(model, tmp_path / "out", {"tokenizer": "gpt2", "vocab_size": 50257})
    acc, acc_norm = expected_hellaswag(reference, tiktoken_gpt2, HELLASWAG)
    lambada_acc, lambada_logp = expected_lambada(reference, tiktoken_gpt2, LAMBADA)
    for source in (["--init_from=resume", f"--out_dir={out_dir}"], [f"--init_from={hf_folder}"]):
        report = json.loads(ngpt("eval", *source, "--task", "hellaswag,lambada", "--hellaswag-file", hellaswag,
                                 "--lambada-file", lambada, "--device=cpu", "--dtype=float32", "--json").stdout)
        assert "train_loss" not in report and report["block_size"] == 64
        h, la = report["hellaswag"], report["lambada"]
        assert h["examples"] == 3 and h["file"] == hellaswag
        assert (h["accuracy"], h["accuracy_norm"]) == pytest.approx((acc, acc_norm))
        assert la["examples"] == 3 and la["accuracy"] == pytest.approx(lambada_acc)
        assert la["mean_logprob"] == pytest.approx(lambada_logp, abs=1e-3)
        assert la["perplexity"] == pytest.approx(math.exp(-lambada_logp), rel=1e-3)
    # a file alone implies its task; --limit takes the first N; the human-readable table
    report = json.loads(ngpt("eval", f"--init_from={hf_folder}", "--lambada-file", lambada, "--limit", "2",
                             "--device=cpu", "--json").stdout)
    assert list(report) == ["model", "block_size", "lambada"] and report["lambada"]["examples"] == 2
    table = ngpt("eval", f"--init_from={hf_folder}", "--hellaswag-file", hellaswag, "--device=cpu").stdout
    assert "hellaswag" in table and "acc_norm" in table


def test_cli_dataset_and_tasks_together(tmp_path, hf_folder, files, tiktoken_gpt2, monkeypatch):
    from nanogpt_cli import checkpoint

    loads, load_model = [], checkpoint.load_model
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: loads.append(a) or load_model(*a, **k))
    folder = tmp_path / "data" / "tiny_bpe"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, 50257, 2000).astype(np.uint16).tofile(folder / f"{split}.bin")
    (folder / "meta.json").write_text(json.dumps({
        "format": 1, "name": "tiny_bpe", "tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16",
        "eot_token": 50256, "splits": {"train": {"file": "train.bin", "tokens": 2000},
                                       "val": {"file": "val.bin", "tokens": 2000}}}))
    report = json.loads(ngpt("eval", f"--init_from={hf_folder}", "--dataset=tiny_bpe",
                             f"--data_dir={tmp_path / 'data'}", "--eval_iters=1", "--batch_size=2",
                             "--block_size=32", "--device=cpu", "--task", "hellaswag", "--hellaswag-file", files[0],
                             "--json").stdout)
    assert report["dataset"] == "tiny_bpe" and "val_loss" in report
    assert report["block_size"] == 32 and report["hellaswag"]["examples"] == 3
    assert len(loads) == 1  # one model serves both


def test_cli_char_level_model_is_refused(tmp_path, files):
    from nanogpt_cli.model import GPT

    model = GPT(GPTConfig(block_size=16, vocab_size=8, n_layer=1, n_head=1, n_embd=8))
    out_dir = save_ngpt_checkpoint(model, tmp_path / "char", {"tokenizer": "char", "vocab_size": 8,
                                                              "itos": list("abcdefg ")})
    result = ngpt("eval", f"--out_dir={out_dir}", "--task", "hellaswag", "--hellaswag-file", files[0],
                  "--device=cpu", code=1)
    one_line_error(result, "character-level", "BPE")


# ---------------------------------------------------------------------------------------------
# Files: reading, bad input, downloads.


def test_readers_skip_blank_lines_and_honour_limit(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps(HELLASWAG[0]) + "\n\n" + json.dumps({**HELLASWAG[1], "label": "2"}) + "\n")
    items = zeroshot.read_hellaswag(path)
    assert [i.label for i in items] == [3, 2] and items[0].ctx == HELLASWAG[0]["ctx"]
    assert len(zeroshot.read_hellaswag(path, limit=1)) == 1
    items = zeroshot.read_lambada(write_jsonl(tmp_path / "lambada_test.jsonl", LAMBADA))
    assert items[2] == zeroshot.LambadaItem("the cat sat on the mat and then the", "cat")


BAD_HELLASWAG = [
    ("", "holds no examples"),
    ("{not json\n", ":1: not a JSON line"),
    (json.dumps(HELLASWAG[0]) + "\n[1, 2]\n", ":2: expected a JSON object"),
    (json.dumps({"text": "a b"}) + "\n", ":1: no 'ctx'"),
    (json.dumps({**HELLASWAG[0], "endings": "one"}) + "\n", ":1: 'endings'"),
    (json.dumps({**HELLASWAG[0], "label": 7}) + "\n", ":1: 'label' must be"),
    (json.dumps({k: v for k, v in HELLASWAG[0].items() if k != "label"}) + "\n", "unlabelled"),
]


@pytest.mark.parametrize(("content", "message"), BAD_HELLASWAG)
def test_bad_hellaswag_file_is_one_line_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(NgptError, match="bad.jsonl") as e:
        zeroshot.read_hellaswag(path)
    assert message in str(e.value)
    result = ngpt("eval", "--task", "hellaswag", "--hellaswag-file", str(path), code=1)  # before any model loads
    one_line_error(result, str(path), message)


@pytest.mark.parametrize(("content", "message"), [
    (json.dumps({"ctx": "x"}) + "\n", ":1: no 'text'"),
    (json.dumps({"text": "nospace"}) + "\n", ":1: the passage needs"),
    (b"\xff\xfe\n", "not UTF-8"),
])
def test_bad_lambada_file(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    one_line_error(ngpt("eval", "--lambada-file", str(path), code=1), str(path), message)


def test_usage_errors(tmp_path):
    one_line_error(ngpt("eval", "--task", "mmlu", code=2), "unknown task 'mmlu'", "hellaswag, lambada")
    one_line_error(ngpt("eval", "--limit", "5", code=2), "--limit", "--task")
    one_line_error(ngpt("eval", "--hellaswag-file", str(tmp_path / "missing.jsonl"), code=2),
                   "no such file", "--hellaswag-file")
    one_line_error(ngpt("eval", "--lambada-file", str(tmp_path), code=2), "is a folder")
    assert zeroshot.parse_tasks(["lambada", "HellaSwag,lambada"]) == ["lambada", "hellaswag"]
    with pytest.raises(UsageError):
        zeroshot.parse_tasks(["hellaswag,nope"])


def test_download_into_the_cache_atomically_and_once(tmp_path, monkeypatch):
    monkeypatch.setenv("NGPT_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append((url, timeout))
        response = io.BytesIO(json.dumps(LAMBADA[2]).encode() + b"\n")
        response.headers = {}  # what a download reads of urlopen's response: the body and its headers
        return response

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    path = zeroshot.benchmark_file("lambada")
    assert path == tmp_path / "cache" / "benchmarks" / "lambada_test.jsonl"
    assert calls == [(zeroshot.LAMBADA_URL, 60)] and os.listdir(path.parent) == ["lambada_test.jsonl"]
    assert zeroshot.benchmark_file("lambada") == path and len(calls) == 1  # cached: no second download
    assert zeroshot.read_lambada(path)[0].word == "cat"


def test_no_network_says_to_pass_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NGPT_CACHE_DIR", str(tmp_path / "cache"))

    def offline(url, timeout=None):
        raise urllib.error.URLError(OSError("[Errno -3] Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    for task, option, url in (("hellaswag", "--hellaswag-file", zeroshot.HELLASWAG_URL),
                              ("lambada", "--lambada-file", zeroshot.LAMBADA_URL)):
        result = ngpt("eval", "--task", task, "--json", code=1)
        one_line_error(result, url, "download it elsewhere", f"{option} PATH")
        assert result.stdout == ""
    assert not any((tmp_path / "cache" / "benchmarks").iterdir())  # no partial file left behind
