"""Hostile input against training, checkpoints, metrics, config and sampling: nothing lost, nothing run through a
planted link, nothing that exhausts memory or hangs. Each case is one attack; see README "What you can rely on"."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from nanogpt_cli.checkpoint import load_checkpoint
from nanogpt_cli.cli import app
from nanogpt_cli.config import SampleConfig, TrainConfig, build
from nanogpt_cli.errors import NgptError, UsageError
from nanogpt_cli.run_folder import RunLock
from nanogpt_cli.train import train
from tests.conftest import TINY

runner = CliRunner()


def ngpt(*args: str):
    return runner.invoke(app, list(args))


def one_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (result.exit_code, result.stderr[-2000:])
    return lines[0]


def snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def run(tiny_cfg, tmp_path):
    """A finished tiny run in tmp_path/out."""
    train(tiny_cfg("--max_iters=3"))
    return tmp_path / "out"


# ---------------------------------------------------------------- files followed where they should not go

def test_a_link_planted_at_the_checkpoints_temporary_name_is_not_followed(tiny_cfg, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / f".ckpt.pt.tmp-{os.getpid()}").symlink_to(victim)  # the name the old code wrote through
    train(tiny_cfg("--max_iters=3"))
    assert victim.read_text() == "precious" and load_checkpoint(out)["iter_num"] == 3


@pytest.mark.parametrize("name", ["config.toml", f".write-test-{os.getpid()}"])  # the old write probe's name
def test_links_at_the_files_a_run_writes_are_replaced_not_followed(tiny_cfg, tmp_path, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(victim)
    train(tiny_cfg("--max_iters=3"), overwrite=True)
    assert victim.read_text() == "precious"


def test_a_metrics_file_that_is_a_link_is_refused(tiny_cfg, tmp_path, run):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(victim)
    train(tiny_cfg("--init_from=resume", "--max_iters=4"))  # the trimmed log replaces the link, never the target
    assert victim.read_text() == "precious" and not (run / "metrics.jsonl").is_symlink()


# ---------------------------------------------------------------- a user's work silently replaced

def test_a_new_run_into_a_folder_with_a_run_is_refused_and_changes_nothing(tmp_path, data_dir, run):
    before = snapshot(run)
    result = ngpt("train", *TINY, f"--data_dir={data_dir}", f"--out_dir={run}")
    assert result.exit_code == 2
    line = one_error(result)
    assert "holds a checkpoint at iteration 3" in line and "--init_from=resume" in line and "--overwrite" in line
    assert snapshot(run) == before
    finetune = ngpt("finetune", *TINY, f"--data_dir={data_dir}", f"--out_dir={run}", f"--init_from={run}")
    assert finetune.exit_code == 2 and "holds a checkpoint" in one_error(finetune)


def test_overwrite_replaces_the_run_only_once_the_new_one_has_set_up(tmp_path, data_dir, run):
    before = snapshot(run)
    refused = ngpt("train", *TINY, f"--data_dir={data_dir}", f"--out_dir={run}", "--overwrite",
                   "--dataset=not_prepared")
    assert refused.exit_code != 0 and snapshot(run) == before  # the refused run destroyed nothing
    replaced = ngpt("train", *TINY, f"--data_dir={data_dir}", f"--out_dir={run}", "--overwrite", "--max_iters=6",
                    "--seed=5")
    assert replaced.exit_code == 0, replaced.stderr
    ckpt = load_checkpoint(run)
    assert ckpt["iter_num"] == 6 and ckpt["config"]["seed"] == 5
    assert [json.loads(line)["iter"] for line in (run / "metrics.jsonl").read_text().splitlines()][0] == 0


def test_an_evaluation_only_writes_nothing(tiny_cfg, run):
    before = snapshot(run)
    result = train(tiny_cfg("--init_from=resume", "--eval_only=True", "--always_save_checkpoint=True"))
    assert result.last_eval and snapshot(run) == before


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first(tiny_cfg, tmp_path, run):
    lock = RunLock(run)
    lock.acquire()  # a running training's lock (flock is per open file: this process counts as another run)
    try:
        before = snapshot(run)
        with pytest.raises(UsageError, match=rf"in use by a running training \(pid {os.getpid()}\)"):
            train(tiny_cfg("--init_from=resume", "--max_iters=5"))
        assert snapshot(run) == before
    finally:
        lock.release()
    train(tiny_cfg("--init_from=resume", "--max_iters=5"))  # free again


# ---------------------------------------------------------------- sizes checked before memory is spent

@pytest.mark.parametrize("args, words", [
    (["--n_layer=1e20"], "for its weights alone"),
    (["--n_embd=4000000", "--n_head=1"], "for its weights alone"),
    (["--batch_size=100000000"], "a training step"),
    (["--block_size=100000000"], "fewer than block_size + 2"),
])
def test_sizes_out_of_reach_are_usage_errors_with_the_estimate(tmp_path, data_dir, args, words):
    start = time.monotonic()
    result = ngpt("train", *TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'x'}", *args)
    assert result.exit_code == 2 and words in one_error(result), result.stderr
    assert time.monotonic() - start < 30 and not (tmp_path / "x").exists()


def test_a_checkpoint_with_an_absurd_shape_is_refused_before_building(tmp_path, run):
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    ckpt["model_args"]["n_layer"] = 10**12
    torch.save(ckpt, run / "ckpt.pt")
    result = ngpt("sample", f"--out_dir={run}", "--device=cpu", "--max_new_tokens=2")
    assert result.exit_code == 2 and "for its weights alone" in one_error(result)


def test_a_sample_batch_that_cannot_fit_is_refused(run):
    result = ngpt("sample", f"--out_dir={run}", "--device=cpu", "--num_samples=100000000000", "--max_new_tokens=2")
    assert result.exit_code == 2 and "--num_samples=100000000000" in one_error(result)


# ---------------------------------------------------------------- internal exceptions in the user's terms

def test_a_truncated_token_file_is_one_line(tmp_path, data_dir):
    folder = data_dir / "tiny_char"
    data = (folder / "train.bin").read_bytes()
    (folder / "train.bin").write_bytes(data[:-1])  # half a uint16 token
    result = ngpt("train", *TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'x'}")
    assert result.exit_code == 1 and "is truncated" in one_error(result)


def test_token_ids_past_the_vocabulary_are_one_line(tmp_path, data_dir):
    import numpy as np

    folder = data_dir / "tiny_char"
    tokens = np.fromfile(folder / "train.bin", dtype=np.uint16)
    tokens[:] = 60000  # a damaged file: ids no embedding row exists for
    tokens.tofile(folder / "train.bin")
    result = ngpt("train", *TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'x'}")
    last = result.stderr.strip().splitlines()[-1]  # found at the first batch, after the run's start lines
    assert result.exit_code == 1 and last.startswith("error: ") and "outside the dataset's vocabulary" in last


def test_a_tiny_temperature_samples_greedily_instead_of_failing(run):
    result = ngpt("sample", f"--out_dir={run}", "--device=cpu", "--max_new_tokens=5", "--temperature=1e-300",
                  "--json")
    greedy = ngpt("sample", f"--out_dir={run}", "--device=cpu", "--max_new_tokens=5", "--temperature=0", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["samples"] == json.loads(greedy.stdout)["samples"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_or_inf_in_a_preset_is_refused_as_on_the_command_line(tmp_path, value):
    preset = tmp_path / "bad.toml"
    preset.write_text(f"learning_rate = {value}\n")
    with pytest.raises(UsageError, match="learning_rate must be a finite number"):
        build(TrainConfig, str(preset))


def test_a_prompt_from_a_closed_stdin_is_one_line(run, monkeypatch):
    from nanogpt_cli.sample import read_prompt

    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(UsageError, match="stdin is closed"):
        read_prompt(build(SampleConfig, None, ["--prompt=-"]))


def test_a_huge_prompt_file_is_refused_before_it_is_read(tmp_path):
    from nanogpt_cli.sample import MAX_PROMPT_BYTES, read_prompt

    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(MAX_PROMPT_BYTES + 1)  # sparse: no disk is spent
    with pytest.raises(UsageError, match="more than the"):
        read_prompt(build(SampleConfig, None, [f"--prompt_file={big}"]))


def test_a_full_disk_at_the_first_save_is_one_line(tiny_cfg, tmp_path, monkeypatch):
    import nanogpt_cli.checkpoint as checkpoint

    def full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(NgptError, match=r"could not save the checkpoint .*enforce fail.*no checkpoint was written"):
        train(tiny_cfg("--max_iters=3"))
    assert not list((tmp_path / "out").glob(".ckpt.pt.tmp-*"))


# ---------------------------------------------------------------- signals honoured within seconds

@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_a_long_evaluation_stops_it_and_saves(tmp_path, data_dir, sig, code):
    """An evaluation of many batches (hours) is stopped at the next batch and the training state is saved; the
    evaluation is not recorded as done, so a resumed run does it again."""
    out = tmp_path / "out"
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    args = [*TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1000", "--eval_iters=1000000"]
    proc = subprocess.Popen([sys.executable, "-m", "nanogpt_cli", "train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists():  # written as the loop starts, with the evaluation at iteration 0
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    time.sleep(1.0)  # into the evaluation's million batches
    sent = time.monotonic()
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == code, err[-2000:]
    assert time.monotonic() - sent < 15
    ckpt = load_checkpoint(out)
    assert ckpt["iter_num"] == 0 and ckpt["evaluated_iter"] < 0  # the interrupted evaluation is not counted
    assert "Traceback" not in err


def test_a_hugging_face_folder_with_pickled_code_is_refused_without_advice_to_run_it(tmp_path):
    """A pytorch_model.bin whose pickle would run code: refused unrun, and the message does not repeat torch's
    advice to load it with weights_only=False."""
    from tests.conftest import require_module

    transformers = require_module("transformers")
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "hf"
    config = transformers.GPT2Config(vocab_size=97, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(folder))
    (folder / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": Exploit()}, folder / "pytorch_model.bin")
    result = ngpt("sample", f"--init_from={folder}", "--device=cpu", "--max_new_tokens=2")
    line = one_error(result)
    assert result.exit_code != 0 and not marker.exists()
    assert "weights_only=False" not in line and "never runs code" in line, line


def test_advice_is_not_to_do_what_was_done(tiny_cfg, monkeypatch):
    """wandb failing under WANDB_MODE=offline must not advise setting WANDB_MODE=offline."""
    from tests.conftest import require_module

    wandb = require_module("wandb")

    def broken(**kwargs):
        raise RuntimeError("the project name is not allowed")

    monkeypatch.setattr(wandb, "init", broken)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(NgptError) as caught:
        train(tiny_cfg("--wandb_log=True"))
    assert "could not start in WANDB_MODE=offline" in str(caught.value) and "set WANDB_MODE" not in str(caught.value)
