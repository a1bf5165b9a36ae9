"""End to end through the real CLI: prepare from a local file, train, resume, sample, eval, export."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nanogpt_cli import __version__
from nanogpt_cli.cli import app, complete_preset
from nanogpt_cli.config import list_presets
from tests.conftest import TEXT, require_module

runner = CliRunner()

TINY = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--max_iters=10", "--lr_decay_iters=10", "--warmup_iters=2", "--eval_interval=5",
        "--eval_iters=2", "--log_interval=1"]


def ngpt(*args: str, code: int = 0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def test_version_and_help():
    assert ngpt("--version").stdout.strip() == f"ngpt {__version__}"
    for command in ("train", "finetune", "sample", "eval", "bench", "presets", "export", "prepare", "data"):
        out = ngpt(command, "--help").stdout
        assert "Usage" in out
    assert "Example" in ngpt("train", "--help").stdout and "--n_layer" in ngpt("train", "--help").stdout
    import typer.main

    group = typer.main.get_command(app)
    leaves = [[name] for name, c in group.commands.items() if not hasattr(c, "commands")]
    leaves += [[name, sub] for name, c in group.commands.items() for sub in getattr(c, "commands", {})]
    for command in [*leaves, ["presets"]]:  # every command's help shows an example
        assert "Example" in ngpt(*command, "--help").stdout, command


def test_eval_and_sample_help_list_only_the_keys_they_read():
    eval_help, sample_help = ngpt("eval", "--help").stdout, ngpt("sample", "--help").stdout
    assert "--eval_iters" in eval_help and "--dataset" in eval_help
    assert "--learning_rate" not in eval_help and "--n_layer" not in eval_help and "--wandb_log" not in eval_help
    assert "--temperature" in sample_help and "--learning_rate" not in sample_help and "--eval_iters" not in sample_help


def test_prepare_train_resume_sample_eval_export(tmp_path, monkeypatch):
    corpus = tmp_path / "input.txt"
    corpus.write_text(TEXT * 3)
    data, out = tmp_path / "data", tmp_path / "out"
    monkeypatch.setenv("NGPT_DATA_DIR", str(data))
    ngpt("prepare", "shakespeare-char", "--source", str(corpus))
    assert (data / "shakespeare_char" / "train.bin").is_file()

    ngpt("train", "--preset", "shakespeare-char", *TINY, f"--out-dir={out}", "--dropout=0.0")
    ckpt_before = (out / "ckpt.pt").stat().st_mtime_ns
    ngpt("train", "--preset", "shakespeare-char", *TINY, "--out_dir", str(out), "--init_from=resume",
         "--max_iters=15", "--lr_decay_iters=15")
    assert (out / "ckpt.pt").stat().st_mtime_ns != ckpt_before
    iters = [json.loads(line)["iter"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert iters == list(range(16))  # resumed at 10 without repeating or skipping a step

    result = ngpt("sample", f"--out-dir={out}", "--prompt", "ROMEO:", "--num-samples=2", "--max-new-tokens=20",
                  "--seed=1")
    assert result.stdout.count("ROMEO:") == 2
    again = ngpt("sample", f"--out-dir={out}", "--prompt", "ROMEO:", "--num-samples=2", "--max-new-tokens=20",
                 "--seed=1")
    assert again.stdout == result.stdout  # a seed makes samples reproducible

    report = json.loads(ngpt("eval", f"--out_dir={out}", "--dataset=shakespeare_char", "--device=cpu",
                             "--eval_iters=2", "--batch_size=4", "--block_size=32", "--json").stdout)
    assert report["val_loss"] > 0 and report["val_perplexity"] == pytest.approx(2.718281828 ** report["val_loss"])

    ngpt("export", str(out), "--to", "hf", str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads_and_trains_through_the_cli(preset, tmp_path):
    """Each preset as shipped, shrunk to a tiny model on synthetic tokens: its own model options, optimizer and
    schedule train 3 steps through `ngpt train` and `ngpt bench`, and the checkpoint keeps its options."""
    from nanogpt_cli.checkpoint import load_checkpoint
    from nanogpt_cli.config import load_preset

    shown = ngpt("presets", "show", preset).stdout
    assert "n_layer" in shown
    tiny = ["--n_layer=1", "--n_head=1", "--n_embd=8", "--block_size=8", "--batch_size=1",
            "--gradient_accumulation_steps=1", "--init_from=scratch", "--device=cpu", "--compile=False"]
    steps = ["--dataset=synthetic", "--vocab_size=64", "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
             "--eval_only=False", "--always_save_checkpoint=True", f"--out_dir={tmp_path}"]
    # a LoRA preset adapts pretrained weights, which scratch has not: its train step is the adapters' (with
    # --lora_rank=0 the same preset trains all the weights), and `ngpt bench` below runs the adapters on scratch
    lora_off = ["--lora_rank=0"] if load_preset(preset).get("lora_rank") else []
    ngpt("train", "--preset", preset, *tiny, *steps, *lora_off)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["iter_num"] == 2 and all(torch.isfinite(w).all() for w in ckpt["model"].values())
    options = load_preset(preset)
    for key in ("position", "norm", "activation", "tie_embeddings", "logit_softcap"):
        if key in options:
            assert ckpt["model_args"][key] == options[key], key
    assert ckpt["config"]["optimizer"] == options.get("optimizer", "adamw")
    result = ngpt("bench", "--preset", preset, *tiny, "--iters", "1", "--warmup", "0", "--json")
    assert json.loads(result.stdout.strip().splitlines()[-1])["iters"] == 1


def test_errors_are_one_line_without_traceback(tmp_path):
    cases = [
        (["train", "--preset", "nope"], 2, "available:"),
        (["train", "--n_layr=4"], 2, "did you mean --n_layer"),
        (["train", "--n_layer=x"], 2, "expects int"),
        (["train", "--device=cpu", f"--data_dir={tmp_path}", "--dataset=shakespeare_char"], 2, "ngpt prepare"),
        (["sample", f"--out_dir={tmp_path}"], 2, "no checkpoint"),
    ]
    for args, code, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == code, (args, result.stdout, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], result.stderr
        assert "Traceback" not in result.stderr + result.stdout


def test_preset_names_complete_on_tab():
    import typer

    assert "shakespeare-char" in complete_preset("shakes") and complete_preset("") == list_presets()
    assert all(name.startswith("gpt2") for name in complete_preset("gpt2")) and complete_preset("nothing") == []
    command = typer.main.get_command(app)
    for name in ("train", "finetune", "sample", "eval", "bench"):  # every --preset, through click's completion
        sub = command.commands[name]
        option = next(param for param in sub.params if "--preset" in param.opts)
        with sub.make_context(name, [], resilient_parsing=True) as ctx:
            assert [item.value for item in option.shell_complete(ctx, "shakes")] == complete_preset("shakes")


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "nanogpt_cli", "--version"], capture_output=True, text=True,
                         env={**os.environ, "NO_COLOR": "1"})
    assert out.returncode == 0 and out.stdout.strip() == f"ngpt {__version__}"


def test_presets_ship_inside_the_wheel(tmp_path):
    """A non-editable install into a fresh venv still finds the presets (and the wheel holds the serve page
    and the int8 kernel's source)."""
    require_module("hatchling")  # the build backend, in the dev extra: the build below runs without isolation
    repo = Path(__file__).resolve().parent.parent
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(wheel_dir), str(repo)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheel_dir.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "nanogpt_cli/static/index.html" in names  # ngpt serve's playground page
    assert "nanogpt_cli/kernels/int8_linear.c" in names  # the int8 kernel's source, built on first use
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
                   check=True, capture_output=True)
    probe = ("import nanogpt_cli.config as c, pathlib; print(c.__file__); print(c.presets_dir()); "
             "print(','.join(c.list_presets()))")
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    module_file, folder, names = out.stdout.strip().splitlines()
    assert str(venv) in module_file and str(venv) in folder  # the installed copy, not this checkout
    assert set(names.split(",")) == set(list_presets())
