"""End-to-end tests of `ngpt prepare ...` and `ngpt data ...` through typer's CliRunner."""

import json

import pytest
import typer
from typer.testing import CliRunner

from nanogpt_cli.cli_data import data_app, prepare_app
from tests.conftest import needs_bpe, require_module

app = typer.Typer()
app.add_typer(prepare_app, name="prepare")
app.add_typer(data_app, name="data")


@pytest.fixture
def ngpt(tmp_path, monkeypatch):
    """Run `ngpt ARGS...` with its data and cache dirs in tmp_path."""
    monkeypatch.setenv("NGPT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NGPT_CACHE_DIR", str(tmp_path / "cache"))
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return run


def meta_of(tmp_path, name):
    return json.loads((tmp_path / "data" / name / "meta.json").read_text())


def assert_one_line_error(result, code, pattern):
    import re

    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.output


def test_shakespeare_char_reference_counts(ngpt, tmp_path, shakespeare):
    result = ngpt("prepare", "shakespeare-char", "--source", shakespeare)
    assert result.exit_code == 0, result.output
    meta = meta_of(tmp_path, "shakespeare_char")
    assert meta["vocab_size"] == len(meta["itos"]) == 65 and meta["tokenizer"] == "char"
    assert meta["splits"]["train"]["tokens"] == 1_003_854 and meta["splits"]["val"]["tokens"] == 111_540
    assert (tmp_path / "data" / "shakespeare_char" / "train.bin").stat().st_size == 2 * 1_003_854
    assert "1,003,854" in result.stdout and "uint16" in result.stdout
    again = ngpt("prepare", "shakespeare-char", "--source", shakespeare)
    assert again.exit_code == 0 and "up to date" in again.stdout
    forced = ngpt("prepare", "shakespeare-char", "--source", shakespeare, "--force")
    assert forced.exit_code == 0 and "up to date" not in forced.stdout


@needs_bpe
def test_shakespeare_gpt2_reference_counts(ngpt, tmp_path, shakespeare):
    result = ngpt("prepare", "shakespeare", "--source", shakespeare)
    assert result.exit_code == 0, result.output
    meta = meta_of(tmp_path, "shakespeare")
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    assert meta["splits"]["train"]["tokens"] == 301_966 and meta["splits"]["val"]["tokens"] == 36_059
    assert meta["eot_token"] == 50256 and meta["documents"] == 1
    # the same file through `prepare text`: same split by characters, plus the EOT that ends the document
    result = ngpt("prepare", "text", shakespeare, "--name", "shakes_text")
    meta = meta_of(tmp_path, "shakes_text")
    assert meta["splits"]["train"]["tokens"] == 301_966 and meta["splits"]["val"]["tokens"] == 36_060


def test_text_folder_jsonl_parquet(ngpt, tmp_path):
    pa = require_module("pyarrow")
    pq = require_module("pyarrow.parquet")
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i in range(8):
        (corpus / "sub" / f"{i}.txt").write_text(f"text file number {i}\n" * 5)
    (corpus / "notes.md.bak").write_text("ignored")
    (corpus / "lines.jsonl").write_text("".join(json.dumps({"body": f"json doc {i}"}) + "\n" for i in range(5)))
    pq.write_table(pa.table({"body": [f"parquet row {i}" for i in range(4)]}), corpus / "rows.parquet")
    result = ngpt("prepare", "text", corpus, "--tokenizer", "char", "--text-field", "body", "--seed", "3")
    assert result.exit_code == 0, result.output
    meta = meta_of(tmp_path, "corpus")
    assert meta["documents"] == 17 and meta["splits"]["val"]["tokens"] > 0
    assert meta["source"] == str(corpus)


def test_data_list_and_info(ngpt, tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 100)
    assert ngpt("prepare", "text", tmp_path / "a.txt", "--tokenizer", "char", "--name", "hello").exit_code == 0
    listed = ngpt("data", "list")
    assert listed.exit_code == 0 and "hello" in listed.stdout and "1,080" in listed.stdout
    rows = json.loads(ngpt("data", "list", "--json").stdout)
    assert rows[0]["name"] == "hello" and rows[0]["tokens"] == {"train": 1080, "val": 120}
    info = ngpt("data", "info", "hello")
    assert info.exit_code == 0 and "fingerprint" in info.stdout and "char" in info.stdout
    meta = json.loads(ngpt("data", "info", "hello", "--json").stdout)
    assert meta["itos"] == [" ", "d", "e", "h", "l", "o", "r", "w"] and meta["complete"]
    assert_one_line_error(ngpt("data", "info", "nope"), 2, r"no dataset 'nope'.*hello")
    empty = ngpt("data", "list", "--data-dir", tmp_path / "elsewhere")
    assert empty.exit_code == 0 and "no datasets" in empty.stdout


def test_bad_input_fails_cleanly_and_keeps_the_dataset(ngpt, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("good text for a dataset. " * 40)
    assert ngpt("prepare", "text", good, "--tokenizer", "char", "--name", "ds").exit_code == 0
    folder = tmp_path / "data" / "ds"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.txt").write_bytes(b"fine so far " * 3 + b"\x80 oops")
    (tmp_path / "nofield.jsonl").write_text('{"text": "a"}\n{"title": "b"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    common = ("--tokenizer", "char", "--name", "ds", "--force")
    cases = [
        (("prepare", "text", tmp_path / "missing.txt", *common), 2, r"no such file or folder: .*missing\.txt"),
        (("prepare", "text", tmp_path / "empty.txt", *common), 2, r"empty corpus"),
        (("prepare", "text", tmp_path / "bad.txt", *common), 2,
         r"bad\.txt: invalid UTF-8 at byte 36 .*--errors replace"),
        (("prepare", "text", tmp_path / "nofield.jsonl", *common), 2, r"nofield\.jsonl:2: no 'text' field"),
        (("prepare", "text", tmp_path / "broken.jsonl", *common), 2, r"broken\.jsonl:2: bad JSON"),
        (("prepare", "text", good, "--tokenizer", "bogus", "--name", "ds", "--force"), 2, r"unknown tokenizer 'bogus'"),
        (("prepare", "text", good, "--errors", "ignore", "--name", "ds"), 2, r"--errors must be"),
        (("prepare", "text", good, "--val-fraction", "1.5", "--name", "ds"), 2, r"--val-fraction"),
        (("prepare", "shakespeare-char", "--source", tmp_path, "--name", "ds", "--force"), 2, r"is a folder"),
        (("prepare", "shakespeare-char", "--source", "http://127.0.0.1:9/input.txt", "--name", "ds", "--force"),
         1, r"could not download .*--source PATH"),
    ]
    for args, code, pattern in cases:
        assert_one_line_error(ngpt(*args), code, pattern)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, args
        assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ds"], args  # no temporary folders

    replaced = ngpt("prepare", "text", tmp_path / "bad.txt", "--tokenizer", "char", "--errors", "replace",
                    "--name", "replaced")
    assert replaced.exit_code == 0, replaced.output
    assert "\ufffd" in meta_of(tmp_path, "replaced")["itos"]


def test_hf_and_openwebtext_from_local_folders(ngpt, tmp_path):
    datasets = require_module("datasets")
    datasets.disable_progress_bars()
    docs = [f"web page {i}: " + "some words here " * (i % 9 + 1) for i in range(400)]
    saved = tmp_path / "owt"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(saved))
    result = ngpt("prepare", "hf", saved, "--tokenizer", "char", "--name", "viahf")
    assert result.exit_code == 0, result.output
    assert meta_of(tmp_path, "viahf")["documents"] == 400
    result = ngpt("prepare", "openwebtext", "--dataset-id", saved, "--tokenizer", "char", "--num-proc", "2")
    assert result.exit_code == 0, result.output
    meta = meta_of(tmp_path, "openwebtext")
    assert meta["documents"] == 400 and meta["options"]["val_fraction"] == 0.0005
    assert_one_line_error(ngpt("prepare", "hf", tmp_path / "owt" / "state.json"), 2, r"is a file")


@pytest.mark.parametrize("command", [[], ["shakespeare-char"], ["shakespeare"], ["openwebtext"], ["text"], ["hf"]])
def test_prepare_help_has_examples(command):
    result = CliRunner().invoke(app, ["prepare", *command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.stdout or not command
    assert "--data-dir" in result.stdout or not command


@pytest.mark.parametrize("command", [["list"], ["info"]])
def test_data_help_has_examples(command):
    result = CliRunner().invoke(app, ["data", *command, "--help"])
    assert result.exit_code == 0 and "Example" in result.stdout and "--json" in result.stdout


@needs_bpe
def test_hf_eot_after_every_document_unless_no_eot(ngpt, tmp_path):
    datasets = require_module("datasets")
    datasets.disable_progress_bars()
    saved = tmp_path / "stories"
    datasets.Dataset.from_dict({"text": [f"story {i}: once upon a time" for i in range(50)]}).save_to_disk(str(saved))
    assert ngpt("prepare", "hf", saved, "--name", "with").exit_code == 0
    result = ngpt("prepare", "hf", saved, "--name", "without", "--no-eot")
    assert result.exit_code == 0, result.output
    with_eot, without = meta_of(tmp_path, "with"), meta_of(tmp_path, "without")
    tokens = {name: sum(s["tokens"] for s in meta["splits"].values()) for name, meta in
              (("with", with_eot), ("without", without))}
    assert tokens["with"] - tokens["without"] == 50
    assert with_eot["options"]["append_eot"] and not without["options"]["append_eot"]
