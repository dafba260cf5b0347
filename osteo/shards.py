"""Pixel shards: images stored many to a file, each under a member name.

A shard is an uncompressed ``.npz`` archive (``shard-00000.npz``, ``shard-00001.npz``, …) that
``numpy.load`` reads. Each member is one image array, with its own shape and dtype. The
pipeline names members by a neutral rank (``000000``, ``000001``, …, the image's place among
the images ingest accepted) rather than by pseudonym, so that later stages publish a shard as
it was written (``link_shards``, ``publish_members``); each record names its shard and member.
Loading is lazy: ``read_shard`` returns a mapping that reads an image only when it is accessed.

Shards are written byte for byte the same for the same images: the archive's timestamps are
fixed, so an unchanged dataset gives unchanged files and DVC stores and pushes them only once.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

SHARD_PATTERN = "shard-{index:05d}.npz"
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # earliest zip timestamp: no write time in the bytes


class ShardWriter:
    """Writes images into consecutive shards of at most ``shard_size`` images.

    A background thread writes each image into its shard as soon as it is added, so the disk
    writes overlap the caller's work and at most ``QUEUED_IMAGES`` images wait in memory. A
    write error is raised by the next ``add`` or by ``close``; closing (or leaving the ``with``
    block) waits until every image is on disk.

    Args:
        directory: where the shards go; created if missing, emptied of old shards.
        shard_size: images per shard.
    """

    QUEUED_IMAGES = 16

    def __init__(self, directory: Path, shard_size: int = 256) -> None:
        self.directory = Path(directory)
        self.shard_size = shard_size
        clear_shards(self.directory)
        self._added = 0
        self._queue: queue.Queue[tuple[str, str, np.ndarray] | None] = queue.Queue(
            maxsize=self.QUEUED_IMAGES)
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._write_queued, name="shard-writer",
                                        daemon=True)
        self._writer.start()

    def add(self, key: str, pixels: np.ndarray) -> str:
        """Queue one image under a member name; returns the shard file it is written to."""
        self._raise_failure()
        name = SHARD_PATTERN.format(index=self._added // self.shard_size)
        self._added += 1
        self._queue.put((name, key, pixels))
        return name

    def close(self) -> None:
        """Wait until every queued image is written."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()
        self._raise_failure()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise OSError(f"cannot write pixel shards in {self.directory}: "
                          f"{self._error}") from self._error

    def _write_queued(self) -> None:
        archive: zipfile.ZipFile | None = None
        try:
            while (item := self._queue.get()) is not None:
                name, key, pixels = item
                if archive is None or archive.filename != str(self.directory / name):
                    if archive is not None:
                        archive.close()
                    archive = zipfile.ZipFile(self.directory / name, "w", zipfile.ZIP_STORED)
                member = zipfile.ZipInfo(f"{key}.npy", date_time=_FIXED_TIME)
                with archive.open(member, "w", force_zip64=True) as handle:
                    np.lib.format.write_array(handle, np.asanyarray(pixels), allow_pickle=False)
        except Exception as error:  # noqa: BLE001 - handed to the caller by add or close
            self._error = error
            while self._queue.get() is not None:  # let a waiting add return
                pass
        finally:
            if archive is not None:
                archive.close()


def read_shard(path: Path) -> np.lib.npyio.NpzFile:
    """Open one shard; images are read when accessed by member name (``shard[member]``)."""
    return np.load(path, allow_pickle=False)


def clear_shards(directory: Path) -> None:
    """Create ``directory`` if missing and remove the shards it holds (links are only unlinked)."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in shard_paths(directory):
        old.unlink()


def link_shards(source: Path, target: Path) -> list[str]:
    """Publish the shards of one directory in another, as hard links where the disk allows.

    A hard link costs no copy of the pixels; on a file system without them (or across
    devices) the shards are copied. Shards already in ``target`` are removed first, so a
    stale shard never survives and no linked file is ever written in place.

    Args:
        source: the directory of the shards to publish.
        target: where to publish them; created if missing.

    Returns:
        The names of the published shards, in order.
    """
    clear_shards(target)
    names = []
    for path in shard_paths(source):
        _link_or_copy(path, target / path.name)
        names.append(path.name)
    return names


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def member_layouts(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The shape and dtype of each image of a shard, read from the array headers only.

    Raises:
        ValueError: when a member is not an array of the ``.npy`` format version 1 or 2.
    """
    layouts = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as handle:
                version = np.lib.format.read_magic(handle)
                if version not in _HEADER_READERS:
                    raise ValueError(f"{path}: {info.filename} is a .npy of version {version}")
                shape, _, dtype = _HEADER_READERS[version](handle)
            layouts[info.filename.removesuffix(".npy")] = (shape, dtype)
    return layouts


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}


def publish_members(source: Path, target: Path, members: Iterable[str]) -> None:
    """Publish some images of a shard as a shard of the same name in another directory.

    A shard that keeps every one of its images is published as a hard link (a copy where the
    disk has none); otherwise the kept images' stored bytes are copied into a new shard,
    without decoding them. ``target`` must not hold a shard of that name yet.

    Args:
        source: the shard.
        target: the directory to publish it in; created if missing.
        members: the images to keep (member names of ``source``).
    """
    target.mkdir(parents=True, exist_ok=True)
    kept = {f"{member}.npy" for member in members}
    with zipfile.ZipFile(source) as archive:
        names = archive.namelist()
        if kept.issuperset(names):
            _link_or_copy(source, target / source.name)
            return
        with zipfile.ZipFile(target / source.name, "w", zipfile.ZIP_STORED) as subset:
            for name in names:
                if name in kept:
                    member = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
                    subset.writestr(member, archive.read(name))


def shard_members(path: Path) -> list[str]:
    """The member names of a shard, read from its index without loading any pixel."""
    with read_shard(path) as shard:
        return list(shard.files)


def shard_paths(directory: Path) -> list[Path]:
    """The shards of a directory, in order."""
    return sorted(Path(directory).glob("shard-*.npz"))


def stored_places(directory: Path) -> set[tuple[str, str]]:
    """``(shard file name, member)`` of every image in a directory's shards, pixels unread."""
    return {(path.name, member) for path in shard_paths(directory)
            for member in shard_members(path)}
