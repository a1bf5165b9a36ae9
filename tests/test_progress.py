"""Terminal conventions: data on stdout, logs on stderr, no ANSI in pipes, NO_COLOR, --quiet/--verbose,
shell completion, and the end-of-training summary on stderr."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from nanogpt_cli import progress
from nanogpt_cli.cli import app
from nanogpt_cli.errors import UsageError
from nanogpt_cli.progress import TrainProgress, configure, make_console
from nanogpt_cli.report import sparkline
from tests.conftest import TINY

runner = CliRunner()


@pytest.fixture(autouse=True)
def default_console():
    configure()
    yield
    configure()


def test_summary_shows_the_loss_sparkline(capsys, tmp_path):
    history = [{"iter": i, "loss": 4.0 - i / 10} for i in range(30)]
    history += [{"iter": i, "train_loss": 4.0 - i / 10, "val_loss": 4.1 - i / 10} for i in (0, 10, 20)]
    result = SimpleNamespace(iter_num=30, best_val_loss=2.1, last_eval={"train": 2.0, "val": 2.1}, seconds=1.5,
                             tokens_per_second=1234.0)
    TrainProgress(30).summary(result, history, tmp_path, 30)
    captured = capsys.readouterr()
    assert captured.out == ""  # a log, on stderr
    assert "training summary" in captured.err and "best val loss" in captured.err
    assert sparkline([r["loss"] for r in history if "loss" in r]) in captured.err
    assert "4.000 → 1.100" in captured.err and "ngpt plot" in captured.err


def test_no_color_strips_colour(monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # a terminal as far as rich knows
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    coloured = make_console()
    coloured.file = io.StringIO()
    coloured.print("[red]hello[/red]")
    assert "\x1b[" in coloured.file.getvalue()

    monkeypatch.setenv("NO_COLOR", "1")
    plain = make_console()
    plain.file = io.StringIO()
    plain.print("[red]hello[/red]")
    assert "\x1b[3" not in plain.file.getvalue() and "hello" in plain.file.getvalue()
    configure()  # the shared consoles pick NO_COLOR up at each command too
    assert progress.console.no_color and progress.out.no_color


def test_live_bar_only_on_a_terminal_and_not_with_verbose_or_quiet(monkeypatch):
    monkeypatch.setattr(type(progress.console), "is_terminal", property(lambda self: True))
    monkeypatch.setenv("TERM", "xterm-256color")
    configure()
    assert progress.is_interactive() and TrainProgress(10).live
    configure(verbose=True)
    assert not progress.is_interactive() and not TrainProgress(10).live and progress.is_verbose()
    configure(quiet=True)
    assert not progress.is_interactive() and progress.console.quiet and not progress.out.quiet
    with pytest.raises(UsageError):
        configure(quiet=True, verbose=True)
    monkeypatch.setenv("TERM", "dumb")
    configure()
    assert not progress.is_interactive()


def test_training_through_a_pipe_has_no_ansi_and_logs_on_stderr(tmp_path, data_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE",
                                                               "NGPT_QUIET", "NGPT_VERBOSE")}
    env["TERM"] = "xterm-256color"  # a colour terminal type, but stdout and stderr are pipes
    proc = subprocess.run([sys.executable, "-m", "nanogpt_cli", "train", *TINY, f"--data_dir={data_dir}",
                           f"--out_dir={tmp_path / 'out'}"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stdout + proc.stderr
    assert proc.stdout == ""  # training has no data output: everything is a log
    assert "iter 0: loss" in proc.stderr and "step 3: train loss" in proc.stderr  # plain lines, not a bar
    assert "training summary" in proc.stderr and "▁" in proc.stderr


def test_quiet_keeps_only_errors_and_data(tmp_path, data_dir):
    out = tmp_path / "out"
    args = [*TINY, f"--data_dir={data_dir}", f"--out_dir={out}"]
    result = runner.invoke(app, ["--quiet", "train", *args])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert (out / "metrics.jsonl").is_file() and (out / "ckpt.pt").is_file()  # quiet, not idle

    sample = runner.invoke(app, ["-q", "sample", f"--out_dir={out}", "--num-samples=2", "--max-new-tokens=5",
                                 "--device=cpu", "--json"])
    assert sample.exit_code == 0, sample.stderr
    assert len(json.loads(sample.stdout)["samples"]) == 2 and sample.stderr == ""

    failed = runner.invoke(app, ["--quiet", "sample", f"--out_dir={tmp_path / 'nothing'}"])
    assert failed.exit_code == 2 and failed.stderr.startswith("error: ") and failed.stdout == ""


def test_verbose_prints_details_and_step_lines(tmp_path, data_dir):
    result = runner.invoke(app, ["--verbose", "train", *TINY, f"--data_dir={data_dir}",
                                 f"--out_dir={tmp_path / 'out'}"])
    assert result.exit_code == 0, result.stderr
    assert "metrics: " in result.stderr and "iter 5: loss" in result.stderr
    assert result.stdout == ""


def test_a_run_on_busy_cores_says_so_once_on_stderr(tmp_path, data_dir, monkeypatch):
    from nanogpt_cli import cpu_tuning

    times = [0, 0]

    def busy() -> tuple[int, int]:  # each look: another second on a core and another second waiting for one
        times[0], times[1] = times[0] + 10**9, times[1] + 10**9
        return tuple(times)

    monkeypatch.setattr(cpu_tuning, "scheduler_times", busy)
    monkeypatch.setattr(cpu_tuning.BusyCores, "FIRST", 1)
    monkeypatch.setattr(cpu_tuning.BusyCores, "WINDOW", 0.0)
    result = runner.invoke(app, ["train", *TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("cores are busy") == 1 and "50% of the time" in result.stderr
    assert result.stdout == ""


def test_shell_completion_is_enabled():
    result = runner.invoke(app, ["--help"])
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout
    assert "--quiet" in result.stdout and "--verbose" in result.stdout
