"""Progress bars for long steps, shown on a terminal and silent in logs, CI and tests."""

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
    """Bars are drawn only on an interactive terminal and when ``OSTEO_PROGRESS`` is not 0."""
    return sys.stderr.isatty() and os.environ.get("OSTEO_PROGRESS", "1") != "0"


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over ``items`` with a progress bar labelled ``description`` when enabled.

    Args:
        items: what to iterate over.
        description: what is being done, e.g. ``"decoding radiographs"``.
        total: number of items, when ``items`` has no length.
    """
    if not progress_enabled():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as progress:
        task_id = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task_id)
