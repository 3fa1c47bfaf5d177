"""Progress display shared by every long job (warm start, distillation, rounds)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console)


@contextmanager
def loss_progress(console: Console, description: str, total: int) -> Iterator[Callable[[int, float], None]]:
    """A bar for ``total`` training steps; yields the ``on_step(step, loss)`` callback that moves it."""
    with progress_bar(console) as progress:
        bar = progress.add_task(description, total=total, status="")
        yield lambda step, loss: progress.update(bar, completed=step + 1, status=f"loss {loss:.3f}")
        progress.update(bar, completed=total)  # a cached warm start takes no steps
