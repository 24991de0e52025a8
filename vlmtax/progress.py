"""Progress bars for long work (rich), quiet when not attached to a terminal unless asked."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def progress_enabled() -> bool:
    flag = os.environ.get("VLMTAX_PROGRESS")
    if flag is not None:
        return flag not in ("0", "false", "")
    return sys.stderr.isatty()


def make_progress() -> Progress:
    from rich.console import Console

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not progress_enabled(),
        transient=False,
    )


def progress_iter(items: Iterable[T], total: int | None, desc: str, unit: str = "it") -> Iterator[T]:
    """Yield from `items` while drawing a bar with a rate (items/s)."""
    import time

    start = time.perf_counter()
    with make_progress() as bar:
        task = bar.add_task(desc, total=total, rate="")
        for n, item in enumerate(items, 1):
            yield item
            elapsed = time.perf_counter() - start
            bar.update(task, advance=1, rate=f"{n / elapsed:.1f} {unit}/s" if elapsed > 0 else "")
