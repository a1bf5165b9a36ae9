"""`ngpt plot`: loss (or bits per byte) curves of one or more runs to a PNG; clear errors without data or
matplotlib."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nanogpt_cli.cli import app
from nanogpt_cli.config import TrainConfig, build
from nanogpt_cli.errors import NgptError
from nanogpt_cli.plot import load_run, plot_runs, run_labels
from nanogpt_cli.prepare import PrepareOptions, prepare_text
from nanogpt_cli.train import train
from tests.conftest import TINY, require_module

runner = CliRunner()


def fake_run(folder: Path, scale: float = 1.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for it in range(21):
        if it % 10 == 0:
            lines.append({"iter": it, "train_loss": scale * (4 - it / 10), "val_loss": scale * (4.1 - it / 10)})
        lines.append({"iter": it, "loss": scale * (4 - it / 10 + 0.05 * (-1) ** it), "lr": 1e-3})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"iter": 21, "lo')
    return folder


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plot_of_a_real_run(tiny_cfg, tmp_path):
    require_module("matplotlib")
    cfg = tiny_cfg()
    train(cfg)
    run = load_run(cfg.out_dir)
    assert len(run["steps"]) == 7 and [i for i, _ in run["val"]] == [0, 3, 6]
    result = runner.invoke(app, ["plot", str(cfg.out_dir), "--output", str(tmp_path / "curve.png")])
    assert result.exit_code == 0, result.stderr
    assert is_png(tmp_path / "curve.png")
    assert result.stdout == ""  # the image is the output; the "wrote" line is a log


def test_several_runs_on_one_chart_default_name(tmp_path, monkeypatch):
    require_module("matplotlib")
    a, b = fake_run(tmp_path / "runs" / "a"), fake_run(tmp_path / "runs" / "b", scale=0.8)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["plot", str(a), str(b)])
    assert result.exit_code == 0, result.stderr
    assert is_png(tmp_path / "loss.png")  # --output defaults to loss.png
    assert "loss.png" in result.stderr


def test_labels_are_run_folders_told_apart_when_names_repeat(tmp_path):
    assert run_labels([tmp_path / "x" / "run", tmp_path / "y" / "run2"]) == ["run", "run2"]
    assert run_labels([tmp_path / "x" / "run", tmp_path / "y" / "run"]) == ["x/run", "y/run"]


def test_a_folder_without_metrics_is_a_one_line_error(tmp_path):
    good = fake_run(tmp_path / "good")
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["plot", str(good), str(tmp_path / "empty"), "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "empty" in result.stderr and "metrics.jsonl" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_names_the_plot_extra(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError
    run = fake_run(tmp_path / "run")
    with pytest.raises(NgptError, match=r"pip install 'nanogpt-cli\[plot\]'"):
        plot_runs([run], tmp_path / "loss.png")
    result = runner.invoke(app, ["plot", str(run), "-o", str(tmp_path / "loss.png")])
    assert result.exit_code == 1 and "nanogpt-cli[plot]" in result.stderr


def test_char_gpt2_and_trained_bpe_runs_of_one_corpus_compare_in_bits_per_byte(tmp_path, shakespeare, bpe_files):
    require_module("matplotlib")
    require_module("tokenizers")
    corpus = tmp_path / "plays.txt"
    corpus.write_text(shakespeare.read_text(encoding="utf-8")[:100_000], encoding="utf-8")  # ASCII
    runs = []
    for name, tokenizer in (("char", "char"), ("gpt2", "gpt2"), ("bpe", "bpe:512")):
        prepare_text([str(corpus)], PrepareOptions(name=name, data_dir=tmp_path / "data", tokenizer=tokenizer,
                                                   quiet=True))
        runs.append(tmp_path / "runs" / name)
        train(build(TrainConfig, None, [*TINY, f"--dataset={name}", f"--data_dir={tmp_path / 'data'}",
                                        f"--out_dir={runs[-1]}", "--max_iters=2", "--eval_interval=2"]))
    curves = {run.name: load_run(run, "bpb") for run in runs}
    assert all(len(c["val"]) == 2 and all(0 < bpb < 20 for _, bpb in c["val"]) for c in curves.values())
    assert not any(c["steps"] for c in curves.values())  # per-step records carry loss only
    char_losses = load_run(runs[0])["val"]
    assert [bpb for _, bpb in curves["char"]["val"]] == pytest.approx([loss / math.log(2) for _, loss in char_losses])

    result = runner.invoke(app, ["plot", *map(str, runs), "--metric", "bpb", "-o", str(tmp_path / "bpb.png")])
    assert result.exit_code == 0, result.stderr
    assert is_png(tmp_path / "bpb.png")


def test_bits_per_byte_of_a_run_without_them_is_a_one_line_error(tmp_path):
    run = fake_run(tmp_path / "old")
    with pytest.raises(NgptError, match="no bits per byte logged"):
        load_run(run, "bpb")
    result = runner.invoke(app, ["plot", str(run), "--metric", "perplexity", "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "--metric must be one of loss, bpb" in result.stderr
