"""Work on many images with an executor, in order, holding only a bounded number in memory.

The ingest stage hands batches of export files to worker processes and joins their results in
file name order. ``Executor.map`` would submit every batch at once and keep every finished
result (model inputs and records) until the caller reaches it; ``ordered_map`` keeps at most
``ahead`` calls in flight, with any ``concurrent.futures`` executor.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

R = TypeVar("R")


def ordered_map(
    pool: Executor, function: Callable[..., R], *iterables: Iterable[Any], ahead: int = 8,
) -> Iterator[R]:
    """Yield ``function(*arguments)`` for each tuple of arguments, in the order given.

    Args:
        pool: the executor that runs the calls.
        function: the work for one item.
        *iterables: the arguments, one iterable per parameter, as for ``map``.
        ahead: calls submitted before their result is taken (at least 1).

    Returns:
        An iterator over the results; an exception raised by a call is raised when its
        result is reached, and the calls not yet started are then cancelled.
    """
    pending: deque[Future[R]] = deque()
    try:
        for arguments in zip(*iterables, strict=True):
            pending.append(pool.submit(function, *arguments))
            if len(pending) >= max(1, ahead):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
