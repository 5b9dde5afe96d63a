"""Progress display for long passes (rich), off when not wanted (tests, non-interactive CI logs) and on every
rank of a process group but rank 0."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .distributed import world

T = TypeVar("T")


def track(items: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True) -> Iterator[T]:
    """Yield from ``items`` while showing a progress bar named ``desc`` (a plain loop when disabled or when this
    process is not rank 0)."""
    if not enabled or world()[0] != 0:
        yield from items
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(desc, total=total)
        for item in items:
            yield item
            progress.advance(task)
