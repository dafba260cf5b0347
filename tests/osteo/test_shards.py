"""Pixel shards: written in the background, the same bytes for the same images, linked."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from osteo.shards import (
    ShardWriter,
    link_shards,
    member_layouts,
    publish_members,
    read_shard,
    shard_members,
    shard_paths,
    stored_places,
)


def images(count: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {f"I{n:016x}": rng.integers(0, 4096, (6 + n, 5), dtype=np.uint16) for n in range(count)}


def write(directory: Path, content: dict[str, np.ndarray], shard_size: int) -> list[str]:
    with ShardWriter(directory, shard_size) as writer:
        return [writer.add(key, pixels) for key, pixels in content.items()]


def digests(directory: Path) -> list[str]:
    return [hashlib.sha256(path.read_bytes()).hexdigest() for path in shard_paths(directory)]


def test_images_fill_consecutive_shards_and_read_back_identical(tmp_path: Path) -> None:
    content = images(7)

    names = write(tmp_path / "shards", content, shard_size=3)

    assert names == ["shard-00000.npz"] * 3 + ["shard-00001.npz"] * 3 + ["shard-00002.npz"]
    assert shard_members(tmp_path / "shards" / "shard-00001.npz") == list(content)[3:6]
    assert stored_places(tmp_path / "shards") == {
        (name, key) for name, key in zip(names, content, strict=True)}
    for name, (key, pixels) in zip(names, content.items(), strict=True):
        with read_shard(tmp_path / "shards" / name) as shard:
            np.testing.assert_array_equal(shard[key], pixels)
            assert shard[key].dtype == pixels.dtype


def test_the_same_images_give_the_same_bytes(tmp_path: Path) -> None:
    """No write time in the archive: DVC sees an unchanged dataset as unchanged."""
    write(tmp_path / "first", images(5), shard_size=2)
    write(tmp_path / "second", images(5), shard_size=2)

    assert digests(tmp_path / "first") == digests(tmp_path / "second")


def test_old_shards_are_removed_when_writing_anew(tmp_path: Path) -> None:
    write(tmp_path / "shards", images(5), shard_size=2)

    write(tmp_path / "shards", images(2), shard_size=2)

    assert [path.name for path in shard_paths(tmp_path / "shards")] == ["shard-00000.npz"]


def test_a_write_failure_is_raised_to_the_caller(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "gone", shard_size=2)
    shutil.rmtree(tmp_path / "gone")

    with pytest.raises(OSError, match="cannot write pixel shards"):
        for key, pixels in images(40).items():
            writer.add(key, pixels)
        writer.close()


def test_published_shards_are_hard_links_and_replace_older_ones(tmp_path: Path) -> None:
    write(tmp_path / "source", images(5), shard_size=2)
    write(tmp_path / "target", images(9), shard_size=2)

    names = link_shards(tmp_path / "source", tmp_path / "target")

    published = shard_paths(tmp_path / "target")
    assert names == [path.name for path in published] == ["shard-00000.npz", "shard-00001.npz",
                                                         "shard-00002.npz"]
    assert all(path.samefile(tmp_path / "source" / path.name) for path in published)
    with read_shard(published[2]) as shard:
        np.testing.assert_array_equal(shard[list(images(5))[4]], list(images(5).values())[4])


def test_member_layouts_give_shape_and_dtype_without_the_pixels(tmp_path: Path) -> None:
    content = images(3)
    write(tmp_path / "shards", content, shard_size=3)

    layouts = member_layouts(tmp_path / "shards" / "shard-00000.npz")

    assert layouts == {key: (pixels.shape, np.dtype(np.uint16)) for key, pixels in content.items()}


def test_a_shard_keeping_some_images_is_rewritten_the_same_way_each_time(tmp_path: Path) -> None:
    content = images(4)
    write(tmp_path / "shards", content, shard_size=4)
    source = tmp_path / "shards" / "shard-00000.npz"
    kept = list(content)[1:3]

    publish_members(source, tmp_path / "first", kept)
    publish_members(source, tmp_path / "second", kept)
    publish_members(source, tmp_path / "whole", content)

    assert shard_members(tmp_path / "first" / source.name) == kept
    assert digests(tmp_path / "first") == digests(tmp_path / "second")
    with read_shard(tmp_path / "first" / source.name) as shard:
        for key in kept:
            np.testing.assert_array_equal(shard[key], content[key])
    assert (tmp_path / "whole" / source.name).samefile(source)
