"""Reliability through real `python -m nanogpt_cli` processes: exact resume, SIGINT/SIGTERM, SIGKILL at any moment."""

from __future__ import annotations

import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanogpt_cli.checkpoint import load_checkpoint
from nanogpt_cli.metrics import read_jsonl
from tests.conftest import TINY

# One thread per process: the machine's cores are shared, and oversubscribed threads make steps crawl.
ENV = {**os.environ, "NO_COLOR": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ENV.pop("NGPT_DEBUG", None)


def ngpt(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanogpt_cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def start(*args: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "nanogpt_cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=ENV)


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 120.0, poll: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before the expected moment:\n{log.read_text()[-3000:]}")
        time.sleep(poll)
    proc.kill()
    raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")


def step_losses(out: Path) -> dict[int, float]:
    return {r["iter"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r}


def eval_losses(out: Path) -> dict[int, float]:
    return {r["iter"]: r["val_loss"] for r in read_jsonl(out / "metrics.jsonl") if "val_loss" in r}


def assert_same_state(a: Path, b: Path) -> None:
    """Two checkpoints with bit-identical weights and optimizer state."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["iter_num"] == cb["iter_num"]
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for i, state in ca["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, cb["optimizer"]["state"][i][k]), (i, k)


# ---------------------------------------------------------------- exact resume

def test_resume_through_the_cli_is_bit_exact_with_dropout_and_accumulation(tmp_path, data_dir):
    """N iterations in one go == N/2, stop, --init_from=resume to N: every loss, eval and weight identical."""
    args = [*TINY, f"--data_dir={data_dir}", "--dropout=0.2", "--gradient_accumulation_steps=3", "--max_iters=8",
            "--lr_decay_iters=8", "--eval_interval=4"]
    full, half = tmp_path / "full", tmp_path / "half"
    for extra in ([f"--out_dir={full}"], [f"--out_dir={half}", "--max_iters=4"],
                  [f"--out_dir={half}", "--init_from=resume"]):
        run = ngpt("train", *args, *extra)
        assert run.returncode == 0, run.stderr[-3000:]
    assert "resuming from iteration 4" in run.stderr
    assert sorted(step_losses(full)) == list(range(9))
    assert step_losses(half) == step_losses(full)  # exact float equality, step by step
    assert eval_losses(half) == eval_losses(full)
    assert_same_state(half, full)


# ---------------------------------------------------------------- SIGINT / SIGTERM

SIGNAL_ARGS = [*TINY, "--dropout=0.1", "--max_iters=100000", "--lr_decay_iters=1000", "--eval_interval=100000"]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_saves_and_says_how_to_resume(tmp_path, data_dir, sig, code):
    out, log = tmp_path / "out", tmp_path / "log.txt"
    args = [*SIGNAL_ARGS, f"--data_dir={data_dir}", f"--out_dir={out}"]
    proc = start("train", *args, log=log)
    wait_for(lambda: len(step_losses(out)) >= 5 if (out / "metrics.jsonl").exists() else False, proc, log)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == code, log.read_text()[-3000:]
    text = log.read_text()
    name = signal.Signals(sig).name
    match = re.search(rf"stopped by {name} at iteration (\d+); checkpoint saved\. Resume with:\n  (.+)\n", text)
    assert match, text[-3000:]
    reached = int(match.group(1))
    ckpt = load_checkpoint(out)
    assert ckpt["iter_num"] == reached and max(step_losses(out)) == reached - 1  # no step lost, none half-done
    assert "Traceback" not in text and not list(out.glob(".ckpt.pt.tmp-*"))
    if sig != signal.SIGTERM:
        return
    # the printed command resumes, and the run continues exactly as if it had never stopped
    hint = shlex.split(match.group(2))
    assert hint[:2] == ["ngpt", "train"] and hint[-1] == "--init_from=resume"
    target = f"--max_iters={reached + 3}"
    resumed = ngpt(*hint[1:], target)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = tmp_path / "reference"
    ref = ngpt("train", *args, f"--out_dir={reference}", target)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert step_losses(out) == step_losses(reference) and len(step_losses(out)) == reached + 4


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_saves_when_its_output_pipe_has_closed(tmp_path, data_dir, sig, code):
    """`ngpt train ... 2>&1 | tee log` and Ctrl-C: the terminal's Ctrl-C ends tee too, so the stop message and
    every line after it meet a closed pipe. The checkpoint must still be saved, at the step the metrics reached."""
    out, log = tmp_path / "out", tmp_path / "log.txt"
    log.write_text("(the run's output went to the pipe)")
    proc = subprocess.Popen([sys.executable, "-m", "nanogpt_cli", "train", *SIGNAL_ARGS, f"--data_dir={data_dir}",
                             f"--out_dir={out}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    assert proc.stdout.readline()  # the run is writing to the pipe
    wait_for(lambda: len(step_losses(out)) >= 5 if (out / "metrics.jsonl").exists() else False, proc, log)
    proc.stdout.close()  # tee is gone
    written = len(step_losses(out))
    wait_for(lambda: len(step_losses(out)) >= written + 3, proc, log)  # steps go on, writing into the closed pipe
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == code
    ckpt = load_checkpoint(out)
    assert ckpt["iter_num"] == max(step_losses(out)) + 1  # saved at the step the metrics reached


def test_sigterm_saves_with_stdout_and_stderr_closed_from_the_start(tmp_path, data_dir):
    out, log = tmp_path / "out", tmp_path / "log.txt"
    log.write_text("(the run had no output)")
    read, write = os.pipe()
    os.close(read)  # every write the run makes fails (EPIPE)
    proc = subprocess.Popen([sys.executable, "-m", "nanogpt_cli", "train", *SIGNAL_ARGS, f"--data_dir={data_dir}",
                             f"--out_dir={out}"], stdout=write, stderr=write, env=ENV)
    os.close(write)
    wait_for(lambda: len(step_losses(out)) >= 5 if (out / "metrics.jsonl").exists() else False, proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert load_checkpoint(out)["iter_num"] == max(step_losses(out)) + 1


def test_a_second_ctrl_c_aborts_at_once(tmp_path, data_dir):
    """With steps of a few seconds, the second SIGINT must not wait for the step (or a save) to finish."""
    out, log = tmp_path / "out", tmp_path / "log.txt"
    proc = start("train", *SIGNAL_ARGS, f"--data_dir={data_dir}", f"--out_dir={out}",
                 "--gradient_accumulation_steps=3000", log=log)  # a step of seconds, even on a fast idle machine
    wait_for(lambda: (out / "metrics.jsonl").exists() and step_losses(out), proc, log)  # step 0 done
    # Into step 1: a Ctrl-C in the instant between step 0's record and the stop check rightly saves at once, and
    # a second one after that save has nothing left to abort.
    time.sleep(0.5)
    assert max(step_losses(out)) == 0, "step 1 ended within 0.5 s: this test needs longer steps"
    began = time.monotonic()
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "finishing this step" in log.read_text(), proc, log, timeout=30)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    text = log.read_text()
    assert "error: interrupted" in text and "checkpoint saved" not in text, text[-2000:]
    assert max(step_losses(out)) == 0, "the aborted step must not have finished"
    assert not (out / "ckpt.pt").exists() and not list(out.glob(".ckpt.pt.tmp-*"))
    assert time.monotonic() - began < 30


# ---------------------------------------------------------------- SIGKILL at any moment

KILL_ARGS = ["--device=cpu", "--compile=False", "--dtype=float32", "--dataset=tiny_char", "--n_layer=2", "--n_head=4",
             "--n_embd=64", "--block_size=32", "--batch_size=4", "--gradient_accumulation_steps=1",
             "--max_iters=100000", "--lr_decay_iters=2000", "--warmup_iters=10", "--learning_rate=1e-3",
             "--eval_interval=1", "--eval_iters=1", "--log_interval=1", "--dropout=0.1"]


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_checkpoint_that_resumes(tmp_path, data_dir):
    """Kill -9 a training run that saves at every step, again and again: every other kill the moment a
    checkpoint write is under way (torch.save, flush, fsync or rename), the others at random moments
    (a step, an evaluation, a save). After every kill ckpt.pt loads with weights_only=True, and the next
    run resumes from exactly that checkpoint; the chain ends with a run that finishes."""
    rng = random.Random(20240601)
    out = tmp_path / "out"
    args = [*KILL_ARGS, f"--data_dir={data_dir}", f"--out_dir={out}"]
    kills, during_save, last_iter = 0, 0, 0
    budget_end = time.monotonic() + 75  # the machine may be shared: a time budget, and a floor on the kills below
    while kills < 20 and time.monotonic() < budget_end:
        log = tmp_path / f"log{kills}.txt"
        proc = start("train", *args, *(["--init_from=resume"] if kills else []), log=log)
        resumed_at = 0
        if kills:  # the checkpoint the last kill left is the one this run restores
            wait_for(lambda log=log: "resuming from iteration" in log.read_text(), proc, log)
            resumed_at = int(re.search(r"resuming from iteration (\d+)", log.read_text()).group(1))
            assert resumed_at == last_iter

        def steps_done(n: int, resumed_at=resumed_at):
            return lambda: (out / "metrics.jsonl").exists() and max(step_losses(out), default=-1) >= resumed_at + n - 1

        def writing(pid=proc.pid) -> bool:  # the save's temporary file: .ckpt.pt.tmp-<pid>-<random>
            return any(out.glob(f".ckpt.pt.tmp-{pid}-*"))

        if kills % 2 == 0:  # once this run has saved a checkpoint, kill it in the middle of writing the next
            wait_for(steps_done(2), proc, log)
            wait_for(writing, proc, log, poll=0.0005)
            time.sleep(rng.uniform(0, 0.01))
        else:  # after a few steps, at a random moment
            wait_for(steps_done(rng.randint(1, 3)), proc, log)
            time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL, log.read_text()[-2000:]
        kills += 1
        during_save += writing()
        raw = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
        assert raw["iter_num"] >= last_iter
        assert all(torch.isfinite(v).all() for v in raw["model"].values())
        last_iter = raw["iter_num"]

    final = ngpt("train", *args, "--init_from=resume", f"--max_iters={last_iter + 2}")
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"resuming from iteration {last_iter}" in final.stderr
    assert not list(out.glob(".ckpt.pt.tmp-*")), "temp files of killed runs are cleaned up"
    assert sorted(step_losses(out)) == list(range(last_iter + 3)), "metrics.jsonl: every step once, none missing"
    print(f"\nSIGKILL test: survived {kills} kills ({during_save} while a checkpoint was being written); "
          f"reached iteration {last_iter + 3}")
    assert kills >= 6 and during_save >= 3, (kills, during_save)


def signals_blocked(pid: int) -> bool:
    """Whether the process holds SIGINT back (its start-up, in nanogpt_cli.__main__)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigBlk:"))
    return bool(mask & (1 << (signal.SIGINT - 1)))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask from /proc")
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_start_up_exits_cleanly(tmp_path, data_dir, sig, code):
    """Ctrl-C while the imports run (torch's take a second or more): exit 130 (SIGTERM 143) once they are done,
    no traceback, no abort inside torch, and the run does not go on."""
    args = [*SIGNAL_ARGS, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}"]
    proc = subprocess.Popen([sys.executable, "-m", "nanogpt_cli", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 30
    while not signals_blocked(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, "start-up never held the signals back"
        time.sleep(0.001)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and "terminate called" not in err and not (tmp_path / "out").exists()
