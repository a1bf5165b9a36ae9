"""The project's own error type: a message for the user and an exit code, never a traceback."""


class NgptError(Exception):
    """A failure the user can act on. The CLI prints `error: <message>` on one line and exits
    with `exit_code`: 2 for usage errors (bad options, values, names), 1 for runtime errors."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(NgptError):
    """Bad command-line input: an unknown key, an ill-typed or out-of-range value."""

    exit_code = 2


class UnknownInitFrom(UsageError):
    """An init_from that names no checkpoint, pretrained GPT-2 or Hugging Face model."""


def one_line(reason: object, limit: int | None = None) -> str:
    """`reason` (an exception, or any text) on one line, its runs of whitespace made single spaces, cut
    to `limit` characters: the part of an error message that a library wrote. An exception with no
    message gives its type's name."""
    text = " ".join(str(reason).split())[:limit]
    if not text and isinstance(reason, BaseException):
        return type(reason).__name__
    return text


def debug_enabled() -> bool:
    """`ngpt --debug ...` (or `--debug` among a command's keys) or NGPT_DEBUG=1: let tracebacks through."""
    import os
    import sys

    if "--debug" in sys.argv or os.environ.get("NGPT_DEBUG", "") not in ("", "0"):
        return True
    # invoked in-process (a CliRunner, or app(...) from Python): sys.argv is someone else's; ask the context
    ctx = current_context()
    return ctx is not None and (bool(ctx.find_root().params.get("debug")) or "--debug" in getattr(ctx, "args", ()))


def current_context():
    """The running command's click context (typer >= 0.20 ships its own copy of click), or None."""
    for module in ("typer._click.globals", "click.globals"):
        try:
            import importlib

            ctx = importlib.import_module(module).get_current_context(silent=True)
        except (ImportError, AttributeError):
            continue
        if ctx is not None:
            return ctx
    return None


LAUNCHED = "NGPT_LAUNCHED"  # set by `ngpt ... --nproc-per-node N` for its workers (see distributed.launch)


def emit_error(line: str) -> None:
    """Print one error line on stderr, in one write (so that the lines of several processes do not interleave).
    In a worker that `ngpt ... --nproc-per-node` started, the line goes to torchrun's error file for this
    worker instead: the launcher prints each different line once, as every rank usually fails alike."""
    import os

    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and os.environ.get(LAUNCHED) == "1":
        import json
        import time

        try:
            with open(error_file, "w", encoding="utf-8") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
            return
        except OSError:
            pass
    write_stderr(line + "\n")


def write_stderr(text: str) -> None:
    """Write and flush text on stderr, in one write; nothing when stderr is gone (a closed pipe): what was being
    said must not cost what the process is doing, and its exit code still says it."""
    import sys

    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def report_errors(func):
    """Decorate a CLI command: the project's errors become one line on stderr and an exit code;
    anything unexpected does too (with a hint), unless debugging is on."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except NgptError as e:
            if debug_enabled():
                raise
            message = str(e).replace("\n", " ")
            emit_error(f"error: {message}")
            raise SystemExit(e.exit_code) from None
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            emit_error("error: interrupted")
            raise SystemExit(130) from None
        except BrokenPipeError:  # the reader went away (`ngpt sample | head`): stop quietly, as `yes | head` does
            silence_stdout()
            raise SystemExit(141) from None
        except SystemExit:
            raise
        except Exception as e:
            if debug_enabled() or type(e).__name__ in ("Exit", "Abort"):  # typer/click control flow
                raise
            message = one_line(e)
            emit_error(f"error: {type(e).__name__}: {message} (rerun with --debug for the traceback)")
            raise SystemExit(1) from None

    return wrapper


def silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's exit-time flush does not complain about the closed pipe."""
    import os
    import sys

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a real file (captured by a test runner)
