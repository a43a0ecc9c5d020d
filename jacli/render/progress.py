"""A progress bar on stderr that appears only for work longer than about a second."""
from __future__ import annotations

import sys
import time


class Progress:
    """Callable with the number of samples just finished; draws nothing until ``delay``
    seconds have passed, nor when disabled or stderr is not a terminal."""

    def __init__(self, total: int, enabled: bool = True, delay: float = 1.0, label: str = "samples"):
        self.total, self.delay, self.label = total, delay, label
        self.enabled = enabled and sys.stderr.isatty()
        self.start, self.done, self.bar, self.task = time.monotonic(), 0, None, None

    def __call__(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is None and time.monotonic() - self.start > self.delay:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TaskProgressColumn, TimeRemainingColumn

            self.bar = Bar("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                           TaskProgressColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
