"""One run at a time in a project directory.

Two runs in one project would interleave their writes to ``work/`` and ``data/`` (one clearing
the shards the other is linking), and DVC would then record a mix of both. Prefect does not
prevent it: a schedule can start a run while a person's run is still going. So the flows and
the commands that write to a project (``osteo prepare``, ``osteo stage``, which ``dvc repro``
runs) hold the project's run lock for as long as they run.

The lock is a POSIX record lock on ``work/run.lock``. The kernel releases it when the holding
process ends, however it ends, so a crashed run never leaves the project locked, and the
worker processes a run forks do not inherit it. The file names its holder, for the message
of the run that is refused.

Limitation: a POSIX lock belongs to its process, and closing any descriptor of the lock file
in that process releases it. Nothing but this module opens ``work/run.lock``; code running
inside a run must not either.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from osteo.config import load_params

LOCK_FILE = Path("work") / "run.lock"

_depth: dict[Path, int] = {}  # projects whose lock this process holds, and how deeply nested


class ProjectBusyError(Exception):
    """Another process holds the project's run lock; the message names it."""


@contextmanager
def project_run(root: Path, command: str) -> Iterator[None]:
    """Hold the run lock of the project ``root`` for the duration of the block.

    Re-entrant within one process: the training flow runs the preparation flow inside its own
    run, and ``osteo prepare`` runs the preparation flow.

    Args:
        root: the project directory.
        command: what runs, for the message another run gets (e.g. ``osteo prepare``).

    Raises:
        ConfigError: when ``root`` is not a project directory (it has no params.yaml); no
            lock file is made there.
        ProjectBusyError: when another process holds the lock.
    """
    root = root.resolve()
    load_params(root)
    if root in _depth:
        _depth[root] += 1
        try:
            yield
        finally:
            _depth[root] -= 1
        return

    path = root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as handle:
        _lock(handle, root)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{command} (process {os.getpid()}, "
                     f"since {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC)\n")
        handle.flush()
        _depth[root] = 1
        try:
            yield
        finally:
            del _depth[root]
            handle.seek(0)
            handle.truncate()
            fcntl.lockf(handle, fcntl.LOCK_UN)


def _lock(handle: IO[str], root: Path) -> None:
    """Take the lock without waiting, or say who holds it."""
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        holder = (root / LOCK_FILE).read_text(encoding="utf-8").strip()
        raise ProjectBusyError(
            f"another run is in progress in {root}: {holder or 'a process'}; wait until it "
            f"ends (its lock, {LOCK_FILE}, is released when that process exits)"
        ) from None
