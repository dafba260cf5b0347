"""Work on many images with worker processes, in order, without pickling the images back.

The ingest stage hands batches of export files to worker processes and joins their results in
file name order. Two pieces make that cheap:

- ``ordered_map`` keeps at most ``ahead`` calls in flight, with any ``concurrent.futures``
  executor. ``Executor.map`` would submit every batch at once and keep every finished result
  until the caller reaches it.
- ``SharedArrays`` is a ring of equally shaped arrays in shared memory that the workers write
  their large results into (the model inputs). Returned through the pool instead, each array
  would be pickled, written to a pipe, read and unpickled, four copies made while both cores
  are busy: a quarter of a second per 1500 images of 224 x 224 on the development machine.
  The workers return only small records and the index of their arrays.

Batch ``i`` of an ``ordered_map`` with ``ahead`` calls in flight can use region ``i % ahead``
of a ``SharedArrays`` of ``ahead`` regions: its region is free again by the time it is
submitted (see ``ordered_map``).
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

R = TypeVar("R")
SHARED_MEMORY_DIR = Path("/dev/shm")  # noqa: S108 - where Linux keeps POSIX shared memory


def ordered_map(
    pool: Executor, function: Callable[..., R], *iterables: Iterable[Any], ahead: int = 8,
) -> Iterator[R]:
    """Yield ``function(*arguments)`` for each tuple of arguments, in the order given.

    The call for item ``i`` is submitted only once the caller has asked for the result that
    follows item ``i - ahead``, that is, once it is done with the result of ``i - ahead``.

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


@dataclass(frozen=True)
class SharedSpec:
    """What a worker process needs to attach to a ``SharedArrays``: it pickles in a few bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: str


class SharedArrays:
    """``regions`` x ``per_region`` arrays of one shape and dtype, in one shared memory block.

    The parent creates it before the worker pool, passes ``spec`` to ``attach`` as the pool's
    initializer, and reads what the workers wrote with ``take``; leaving the ``with`` block
    frees the memory. Workers write into ``attached()``, indexed like ``take``.

    Args:
        regions: independent groups of arrays, one per call in flight.
        per_region: arrays per region (images per batch).
        shape: shape of one array.
        dtype: dtype of the arrays.

    Raises:
        OSError: when the system has not enough free shared memory for the block.
    """

    def __init__(
        self, regions: int, per_region: int, shape: tuple[int, ...], dtype: str,
    ) -> None:
        full_shape = (regions, per_region, *shape)
        size = max(1, int(np.prod(full_shape)) * np.dtype(dtype).itemsize)
        _check_room(size)
        self._memory = shared_memory.SharedMemory(create=True, size=size)
        self.spec = SharedSpec(self._memory.name, full_shape, dtype)
        self._arrays: np.ndarray | None = np.ndarray(full_shape, dtype, buffer=self._memory.buf)

    def take(self, region: int, index: int) -> np.ndarray:
        """A copy of one array, so that its slot can be written again."""
        if self._arrays is None:
            raise ValueError("the shared arrays are closed")
        return self._arrays[region, index].copy()

    def close(self) -> None:
        """Release and remove the shared memory block."""
        if self._arrays is not None:
            self._arrays = None  # the buffer cannot be closed while a view of it exists
            self._memory.close()
            self._memory.unlink()

    def __enter__(self) -> SharedArrays:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_room(size: int) -> None:
    """Refuse a block larger than the free shared memory, before a worker crashes writing it.

    Linux creates the block as a sparse file of /dev/shm (a container's is 64 MB by default):
    creating it succeeds whatever its size, and the first write past the free space kills the
    writing process.

    Raises:
        OSError: (``ENOSPC``) when /dev/shm has less than ``size`` bytes free.
    """
    if not SHARED_MEMORY_DIR.is_dir():
        return
    stats = os.statvfs(SHARED_MEMORY_DIR)
    free = stats.f_bavail * stats.f_frsize
    if size > free:
        raise OSError(errno.ENOSPC, f"{SHARED_MEMORY_DIR} has {free / 2**20:.0f} MiB free, "
                                    f"{size / 2**20:.0f} MiB are needed")


_attached: tuple[shared_memory.SharedMemory, np.ndarray] | None = None


def attach(spec: SharedSpec) -> None:
    """In a worker process: map the parent's ``SharedArrays`` (a pool initializer)."""
    global _attached  # one mapping per worker process, kept for its lifetime
    memory = shared_memory.SharedMemory(name=spec.name)
    _attached = (memory, np.ndarray(spec.shape, spec.dtype, buffer=memory.buf))


def attached() -> np.ndarray:
    """In a worker process: the arrays ``attach`` mapped, shaped (regions, per_region, ...)."""
    if _attached is None:
        raise RuntimeError("no shared arrays are attached in this process")
    return _attached[1]
