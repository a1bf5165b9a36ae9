"""The rich consoles and progress display: quiet on non-zero ranks, plain text in pipes.

Conventions: data (samples, JSON) goes to stdout through `echo`; human-readable results
(tables) go to stdout through `out`; logs, progress and warnings go to stderr through
`console`, so `ngpt sample ... > file` captures only the samples. Neither console writes
colour when NO_COLOR is set, and neither writes ANSI codes or live bars into a pipe or file.
`--quiet` (or NGPT_QUIET=1) silences `console`; `--verbose` (or NGPT_VERBOSE=1) prints a line
per step even on a terminal, plus debug details.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _no_color() -> bool:
    """NO_COLOR (https://no-color.org): set and not empty means no colour."""
    return os.environ.get("NO_COLOR", "") != ""


class LogStream:
    """sys.stderr as the log console writes it: a write that fails (a closed pipe, as when Ctrl-C also ends the
    `tee` that reads a run's output; a full disk) drops that line and every later one to the same stream instead
    of raising. Logs are never worth a run: a stop in progress still saves its checkpoint. Looked up at each
    write, so that a test runner's replacement of sys.stderr is honoured."""

    def __init__(self):
        self.broken: object | None = None  # the stream that failed

    def _target(self):
        return None if sys.stderr is self.broken else sys.stderr

    def write(self, text: str) -> int:
        target = self._target()
        if target is not None:
            try:
                target.write(text)
            except (OSError, ValueError):  # ValueError: the file was closed
                self.broken = target
        return len(text)

    def flush(self) -> None:
        target = self._target()
        if target is not None:
            try:
                target.flush()
            except (OSError, ValueError):
                self.broken = target

    def isatty(self) -> bool:
        target = self._target()
        try:
            return target is not None and target.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return sys.stderr.fileno()

    @property
    def encoding(self) -> str:
        return getattr(sys.stderr, "encoding", None) or "utf-8"


def make_console(stderr: bool = False) -> Console:
    quiet = _rank() != 0 or (stderr and _env_flag("NGPT_QUIET"))
    file = LogStream() if stderr else None
    return Console(file=file, quiet=quiet, highlight=False, soft_wrap=True, no_color=_no_color())


console = make_console(stderr=True)  # logs, progress, warnings: stderr
out = make_console()  # human-readable results (tables, reports): stdout
_verbose = _env_flag("NGPT_VERBOSE")


def configure(quiet: bool = False, verbose: bool = False) -> None:
    """Apply the global --quiet/--verbose flags (and re-read NGPT_QUIET, NGPT_VERBOSE, NO_COLOR).

    The consoles are changed in place: other modules hold references to them.
    """
    global _verbose
    if quiet and verbose:
        from nanogpt_cli.errors import UsageError

        raise UsageError("--quiet and --verbose contradict each other; use one")
    _verbose = (verbose or _env_flag("NGPT_VERBOSE")) and not quiet
    console.quiet = _rank() != 0 or quiet or (_env_flag("NGPT_QUIET") and not verbose)
    out.quiet = _rank() != 0
    for c in (console, out):
        c.no_color = _no_color()


def is_verbose() -> bool:
    return _verbose and not console.quiet


def is_interactive() -> bool:
    """Live bars only for a person at a terminal (and not with --verbose, which wants plain lines)."""
    return console.is_terminal and not console.quiet and not _verbose and os.environ.get("TERM") != "dumb"


def debug(text: str) -> None:
    """A detail shown only with --verbose."""
    if is_verbose():
        console.print(text, style="dim", markup=False)


def echo(text: str) -> None:
    """Raw data to stdout (samples, JSON), on rank 0, with no markup processing."""
    if _rank() == 0:
        sys.stdout.write(text)
        sys.stdout.flush()


class TrainProgress:
    """A live bar (iter, loss, lr, tokens/s, MFU, ETA, last eval) on a terminal; log lines otherwise."""

    def __init__(self, max_iters: int, start_iter: int = 0):
        self.max_iters, self.start_iter = max_iters, start_iter
        self.live = is_interactive()
        self.bar = None
        self.last_eval = ""

    def __enter__(self):
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]iter[/bold] {task.completed:>6.0f}/{task.total:.0f}"), BarColumn(),
                                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"),
                                TimeRemainingColumn(), console=console, transient=False)
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.max_iters, completed=self.start_iter, stats="")
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def eval(self, it: int, losses: dict) -> None:
        self.last_eval = f"val {losses['val']:.4f}"
        bpb = f" ({losses['val_bpb']:.4f} bits per byte)" if "val_bpb" in losses else ""
        console.print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{bpb}")

    def step(self, it: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None, ms: float) -> None:
        mfu_text = f"{mfu * 100:.2f}%" if mfu is not None else "n/a"
        if self.bar is not None:
            stats = f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s mfu {mfu_text} {self.last_eval}"
            self.bar.update(self.task, completed=min(it, self.max_iters), stats=stats)
        else:
            console.print(f"iter {it - 1}: loss {loss:.4f}, lr {lr:.3e}, time {ms:.2f}ms, "
                          f"{tokens_per_s:,.0f} tok/s, mfu {mfu_text}")

    def summary(self, result, history: list[dict], out_dir, iters_run: int) -> None:
        from nanogpt_cli.report import training_summary

        console.print(training_summary(result, history, out_dir, iters_run))
