"""The error type and the CLI's error boundary: one `error:` line, the right exit code, tracebacks only on demand."""

from __future__ import annotations

import pytest
import typer

from nanogpt_cli.errors import NgptError, UsageError, debug_enabled, one_line, report_errors


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("NGPT_DEBUG", raising=False)
    monkeypatch.setattr("sys.argv", ["ngpt", "train"])


def raising(exc: BaseException):
    @report_errors
    def command():
        raise exc

    return command


def run(exc: BaseException, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        raising(exc)()
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def test_exit_codes_of_the_error_types():
    assert NgptError("x").exit_code == 1 and UsageError("x").exit_code == 2
    assert NgptError("x", exit_code=3).exit_code == 3 and isinstance(UsageError("x"), NgptError)


def test_one_line():
    assert one_line(OSError("could not\n  connect:\tretry  later ")) == "could not connect: retry later"
    assert one_line(ValueError("a b c d e"), 5) == "a b c"
    assert one_line("  text\r\nof a library ") == "text of a library"
    assert one_line(KeyboardInterrupt()) == "KeyboardInterrupt"  # no message: the type says what happened
    assert one_line(RuntimeError("x" * 500)) == "x" * 500 and one_line("") == ""


@pytest.mark.parametrize("exc, code, line", [
    (UsageError("--batch_size must be positive, got 0"), 2, "error: --batch_size must be positive, got 0\n"),
    (NgptError("no checkpoint at out/ckpt.pt;\nrun one first"), 1,
     "error: no checkpoint at out/ckpt.pt; run one first\n"),  # one line, even for a message with newlines
    (ValueError("something\n  unexpected"), 1,
     "error: ValueError: something unexpected (rerun with --debug for the traceback)\n"),
    (ZeroDivisionError(), 1, "error: ZeroDivisionError: ZeroDivisionError (rerun with --debug for the traceback)\n"),
    (KeyboardInterrupt(), 130, "error: interrupted\n"),
])
def test_errors_become_one_line_and_an_exit_code(exc, code, line, capsys):
    assert run(exc, capsys) == (code, "", line)


def test_a_closed_pipe_exits_quietly(capsys):
    assert run(BrokenPipeError(), capsys) == (141, "", "")


def test_control_flow_passes_through():
    with pytest.raises(typer.Exit):
        raising(typer.Exit(3))()
    with pytest.raises(SystemExit) as stop:
        raising(SystemExit(143))()
    assert stop.value.code == 143


@pytest.mark.parametrize("how", ["env", "argv"])
def test_debug_lets_the_original_exception_through(how, monkeypatch, capsys):
    if how == "env":
        monkeypatch.setenv("NGPT_DEBUG", "1")
    else:
        monkeypatch.setattr("sys.argv", ["ngpt", "--debug", "train"])
    assert debug_enabled()
    for exc in (UsageError("bad"), ValueError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            raising(exc)()
    assert capsys.readouterr().err == ""


def test_debug_is_off_by_default_and_for_ngpt_debug_0(monkeypatch):
    assert not debug_enabled()
    monkeypatch.setenv("NGPT_DEBUG", "0")
    assert not debug_enabled()
