"""Ordered work in worker processes: calls in flight, and arrays written to shared memory."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from osteo.parallel import SharedArrays, attach, attached, ordered_map


def test_ordered_map_yields_results_in_order_and_raises_a_calls_error() -> None:
    with ThreadPoolExecutor(2) as pool:
        assert list(ordered_map(pool, pow, [2, 3, 4], [2, 2, 2], ahead=2)) == [4, 9, 16]
        with pytest.raises(ZeroDivisionError):
            list(ordered_map(pool, divmod, [1, 1], [1, 0]))


class RecordingExecutor(ThreadPoolExecutor):
    """Notes each submitted item and how many results the caller had taken by then."""

    def __init__(self) -> None:
        super().__init__(1)
        self.taken = 0
        self.submitted_after: list[int] = []

    def submit(self, function: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted_after.append(self.taken)
        return super().submit(function, *args, **kwargs)


def test_a_call_is_submitted_only_after_the_result_ahead_of_it_was_taken() -> None:
    """What lets batch i reuse the shared region of batch i - ahead."""
    ahead = 3
    with RecordingExecutor() as pool:
        for _ in ordered_map(pool, abs, range(10), ahead=ahead):
            pool.taken += 1

    for item, taken in enumerate(pool.submitted_after):
        assert taken >= item - ahead + 1


def _fill(region: int, index: int, value: float) -> None:
    attached()[region, index] = value


def test_workers_write_arrays_the_parent_reads_without_pickling_them() -> None:
    context = multiprocessing.get_context("fork")
    with (SharedArrays(2, 3, (4, 5), "float16") as shared,
          ProcessPoolExecutor(2, mp_context=context, initializer=attach,
                              initargs=(shared.spec,)) as pool):
        list(pool.map(_fill, [0, 1, 1], [0, 2, 1], [1.5, -2.0, 3.0]))

        assert shared.take(0, 0).shape == (4, 5)
        assert np.all(shared.take(0, 0) == 1.5)
        assert np.all(shared.take(1, 2) == -2.0)
        taken = shared.take(1, 1)
        pool.submit(_fill, 1, 1, 0.0).result()
        assert np.all(taken == 3.0)  # a copy: the slot can be written again
        assert np.all(shared.take(1, 1) == 0.0)

    with pytest.raises(ValueError, match="closed"):
        shared.take(0, 0)


def test_a_block_larger_than_the_free_shared_memory_is_refused_before_any_write() -> None:
    with pytest.raises(OSError, match="MiB are needed"):
        SharedArrays(1, 1, (1 << 20, 1 << 20), "float16")  # 2 TiB
