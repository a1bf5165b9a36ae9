"""The rich consoles and progress display: quiet on non-zero ranks, plain text in pipes.

Conventions: data (samples, JSON) goes to stdout through `echo`; human-readable results
(tables) go to stdout through `out`; logs, progress and warnings go to stderr through
`console`, so `ngpt sample ... > file` captures only the samples. Neither console writes
colour when NO_COLOR is set, and neither writes ANSI codes or live bars into a pipe or file.
`--quiet` (or NGPT_QUIET=1) silences `console`; `--verbose` (or NGPT_VERBOSE=1) prints a line
per step even on a terminal, plus debug details.
"""

from __future__ import annotations

import math
import os
import shlex
import sys

from rich.console import Console


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _no_color() -> bool:
    """NO_COLOR (https://no-color.org): set and not empty means no colour."""
    return os.environ.get("NO_COLOR", "") != ""


def make_console(stderr: bool = False) -> Console:
    quiet = _rank() != 0 or (stderr and _env_flag("NGPT_QUIET"))
    return Console(stderr=stderr, quiet=quiet, highlight=False, soft_wrap=True, no_color=_no_color())


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


def print0(*args, **kwargs) -> None:
    """Print a log line on rank 0 only (the console is quiet elsewhere)."""
    console.print(*args, **kwargs)


def debug(text: str) -> None:
    """A detail shown only with --verbose."""
    if is_verbose():
        console.print(text, style="dim", markup=False)


def echo(text: str) -> None:
    """Raw data to stdout (samples, JSON), on rank 0, with no markup processing."""
    if _rank() == 0:
        sys.stdout.write(text)
        sys.stdout.flush()


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    """A one-line picture of a curve: the loss at a glance in the end-of-run summary."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return ""
    if len(values) > width:  # average into `width` buckets
        step = len(values) / width
        values = [sum(chunk) / len(chunk) for i in range(width)
                  if (chunk := values[int(i * step):max(int(i * step) + 1, int((i + 1) * step))])]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - lo) / span * (len(SPARKS) - 1) + 0.5))] for v in values)


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
        console.print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")

    def step(self, it: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None, ms: float) -> None:
        mfu_text = f"{mfu * 100:.2f}%" if mfu is not None else "n/a"
        if self.bar is not None:
            stats = f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s mfu {mfu_text} {self.last_eval}"
            self.bar.update(self.task, completed=min(it, self.max_iters), stats=stats)
        else:
            console.print(f"iter {it - 1}: loss {loss:.4f}, lr {lr:.3e}, time {ms:.2f}ms, "
                          f"{tokens_per_s:,.0f} tok/s, mfu {mfu_text}")

    def summary(self, result, history: list[dict], out_dir, iters_run: int) -> None:
        from rich.table import Table
        from rich.text import Text

        losses = [r["loss"] for r in history if "loss" in r]
        table = Table(title="training summary", show_header=False)
        table.add_row("iterations", f"{result.iter_num} ({iters_run} this run)")
        table.add_row("best val loss", f"{result.best_val_loss:.4f}" if result.best_val_loss < float("inf") else "-")
        if result.last_eval:
            table.add_row("last eval", f"train {result.last_eval['train']:.4f}, val {result.last_eval['val']:.4f}")
        table.add_row("wall time", f"{result.seconds:.1f} s")
        if result.tokens_per_second:
            table.add_row("tokens/s (last)", f"{result.tokens_per_second:,.0f}")
        if losses:
            table.add_row("train loss", f"{sparkline(losses)} {losses[0]:.3f} → {losses[-1]:.3f}")
        val = [r["val_loss"] for r in history if "val_loss" in r]
        if len(val) > 1:
            table.add_row("val loss", f"{sparkline(val)} {val[0]:.3f} → {val[-1]:.3f}")
        table.add_row("out_dir", Text(f"{out_dir} (metrics.jsonl, config.toml)"))
        table.add_row("loss plot", Text(f"ngpt plot {shlex.quote(str(out_dir))}"))
        console.print(table)
