"""A progress bar on stderr that appears only for work longer than about a second."""
from __future__ import annotations

import sys
import time


class Progress:
    """Callable with the number of samples just finished (fractions too: a sample streamed
    in parts advances part by part). Draws nothing until ``delay``
    seconds have passed, nor when disabled or stderr is not a terminal; then a bar with
    samples done, rate and time remaining (rich, imported only then)."""

    def __init__(self, total: int, enabled: bool = True, delay: float = 1.0, label: str = "samples"):
        self.total, self.delay, self.label = total, delay, label
        self.enabled = enabled and sys.stderr.isatty()
        self.start, self.done, self.bar, self.task = time.monotonic(), 0, None, None

    def __call__(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        if self.bar is None and elapsed > self.delay:
            self.bar = _bar()
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total, rate="")
        if self.bar is not None:
            per_second = self.done / elapsed if elapsed > 0 else 0
            rate = f"{per_second:,.0f} {self.label}/s" if per_second >= 10 else f"{per_second:.2g} {self.label}/s"
            self.bar.update(self.task, completed=self.done, rate=rate)
            self.bar.refresh()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


def _bar():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    return Bar("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
               console=Console(stderr=True), transient=True)
