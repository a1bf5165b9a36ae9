"""Progress while preparing: a live rich bar on a terminal, a plain line every PROGRESS_SECONDS otherwise."""

from __future__ import annotations

import time

PROGRESS_SECONDS = 10.0  # how often plain progress lines are printed when not on a terminal


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return str(n)


class Progress:
    def __init__(self, description: str, total: float | None, unit: str, quiet: bool = False):
        from nanogpt_cli.progress import console, is_interactive

        self.description, self.total, self.unit, self.console = description, total, unit, console
        self.done = self.tokens = 0.0
        self.start = self.last_line = time.time()
        self.quiet = quiet or console.quiet
        self.bar = None
        if not self.quiet and is_interactive():
            from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                                    TimeRemainingColumn(), console=console, transient=True)
            self.task = self.bar.add_task(description, total=total, info="")
            self.bar.start()

    def _info(self) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        done = f"{_human(self.done)}B" if self.unit == "bytes" else f"{self.done:,.0f} docs"
        if self.total:
            done += f" / {_human(self.total)}B" if self.unit == "bytes" else f" / {self.total:,.0f}"
        rate = f"{_human(self.done / elapsed)}B/s" if self.unit == "bytes" else f"{self.done / elapsed:,.0f} docs/s"
        tokens = f", {_human(self.tokens)} tokens ({_human(self.tokens / elapsed)}/s)" if self.tokens else ""
        return f"{done}, {rate}{tokens}"

    def advance(self, amount: float, tokens: int = 0) -> None:
        self.done += amount
        self.tokens += tokens
        if self.quiet:
            return
        now = time.time()
        if self.bar is not None and now - self.last_line >= 0.1:  # called per document: redraw 10 times a second
            self.last_line = now
            self.bar.update(self.task, completed=self.done, info=self._info())
        elif self.bar is None and now - self.last_line >= PROGRESS_SECONDS:
            self.last_line = now
            eta = ""
            if self.total and self.done:
                eta = f", ETA {(self.total - self.done) * (now - self.start) / self.done:.0f}s"
            self.console.print(f"{self.description}: {self._info()}{eta}", markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, info=self._info())
            self.bar.stop()
            self.bar = None
