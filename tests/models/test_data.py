"""The in-memory training data: joining, loading, class balance and augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from models.data import (
    RadiographDataModule,
    TrainingDataError,
    augment_batch,
    augment_labels,
)
from osteo.layout import Layout
from osteo.shards import ShardWriter


def write_prepared_dataset(root: Path, images: int = 24, size: int = 64, seed: int = 0) -> Layout:
    """A tiny prepared dataset and split: 2/3 train (1 in 4 osteoporosis), 1/6 val, 1/6 test.

    Osteoporosis images are darker on average, so a model has something to learn.
    """
    rng = np.random.default_rng(seed)
    layout = Layout(root)
    n_train, n_val = images * 2 // 3, images // 6
    split = ["train"] * n_train + ["val"] * n_val + ["test"] * (images - n_train - n_val)
    rows = []
    with ShardWriter(layout.prepared_pixel_dir, shard_size=10) as writer:
        for index in range(images):
            osteoporosis = index % 4 == 0 if index < n_train else index % 2 == 0
            level = 0.35 if osteoporosis else 0.6
            pixels = np.clip(level + 0.1 * rng.standard_normal((size, size)), 0, 1)
            image_id = f"I{index:016x}"
            rows.append({
                "image_id": image_id, "patient_id": f"P{index:016x}",
                "age": float(rng.integers(40, 90)), "sex": "F" if index % 2 else "M",
                "bmi": float(rng.normal(25.0, 4.0)),
                "label": "osteoporosis" if osteoporosis else "normal",
                "shard": writer.add(f"{index:06d}", pixels.astype(np.float16)),
                "member": f"{index:06d}",
            })
    records = pd.DataFrame(rows)
    layout.prepared_records.parent.mkdir(parents=True, exist_ok=True)
    records.to_parquet(layout.prepared_records, index=False)
    layout.split_dir.mkdir(parents=True, exist_ok=True)
    records[["image_id", "patient_id"]].assign(split=split).to_parquet(layout.split_table,
                                                                      index=False)
    return layout


def data_module(layout: Layout, **options: object) -> RadiographDataModule:
    module = RadiographDataModule(layout.prepared_records, layout.prepared_pixel_dir,
                                  layout.split_table, batch_size=8, **options)  # type: ignore[arg-type]
    module.setup("fit")
    return module


def test_every_split_is_held_in_memory_with_its_images_in_record_order(tmp_path: Path) -> None:
    layout = write_prepared_dataset(tmp_path)
    data = data_module(layout)

    assert {name: len(split) for name, split in data.splits.items()} == {
        "train": 16, "val": 4, "test": 4}
    records = pd.read_parquet(layout.prepared_records).set_index("image_id")
    val = data.splits["val"]
    assert val.images.dtype == torch.float16 and tuple(val.images.shape) == (4, 1, 64, 64)
    for row, image_id in enumerate(val.records["image_id"]):
        assert val.clinical[row, 0].item() == records.loc[image_id, "age"]
        assert val.labels[row].item() == (records.loc[image_id, "label"] == "osteoporosis")
    assert data.image_size == 64


def test_images_follow_the_split_tables_order_not_the_records(tmp_path: Path) -> None:
    """The split stage orders its table by content; training must keep that order."""
    layout = write_prepared_dataset(tmp_path)
    table = pd.read_parquet(layout.split_table).sample(frac=1.0, random_state=3)
    table.to_parquet(layout.split_table, index=False)

    data = data_module(layout)

    for name, split in data.splits.items():
        expected = table.loc[table["split"] == name, "image_id"].tolist()
        assert split.records["image_id"].tolist() == expected


def test_standardisation_statistics_come_from_the_train_split_only(tmp_path: Path) -> None:
    layout = write_prepared_dataset(tmp_path)
    data = data_module(layout)
    records = pd.read_parquet(layout.prepared_records)
    split = pd.read_parquet(layout.split_table)
    train = records[split["split"].to_numpy() == "train"]

    stats = data.clinical_stats()

    assert stats.age_mean == pytest.approx(train["age"].mean())
    assert stats.bmi_std == pytest.approx(train["bmi"].std(ddof=0), rel=1e-5)
    assert stats.age_mean != pytest.approx(records["age"].mean())


def test_image_without_split_stops_with_the_file_named(tmp_path: Path) -> None:
    layout = write_prepared_dataset(tmp_path)
    split = pd.read_parquet(layout.split_table)
    split.iloc[1:].to_parquet(layout.split_table, index=False)

    with pytest.raises(TrainingDataError, match="1 prepared images have no split") as error:
        data_module(layout)
    assert str(layout.split_table) in str(error.value)


def test_image_missing_from_its_shard_is_named(tmp_path: Path) -> None:
    layout = write_prepared_dataset(tmp_path)
    records = pd.read_parquet(layout.prepared_records)
    records.loc[0, "shard"] = records.loc[records.index[-1], "shard"]
    records.to_parquet(layout.prepared_records, index=False)

    with pytest.raises(TrainingDataError, match=f"lacks image {records.loc[0, 'image_id']}"):
        data_module(layout)


def test_validation_split_without_osteoporosis_is_refused(tmp_path: Path) -> None:
    layout = write_prepared_dataset(tmp_path)
    records = pd.read_parquet(layout.prepared_records)
    split = pd.read_parquet(layout.split_table)
    records.loc[split["split"].to_numpy() == "val", "label"] = "normal"
    records.to_parquet(layout.prepared_records, index=False)

    with pytest.raises(TrainingDataError, match="val split needs both"):
        data_module(layout)


def test_class_weights_make_both_classes_count_equally(tmp_path: Path) -> None:
    data = data_module(write_prepared_dataset(tmp_path))

    counts, weights = data.class_counts(), data.class_weights()

    assert counts == [12, 4]
    assert weights is not None
    assert counts[0] * weights[0] == pytest.approx(counts[1] * weights[1])
    assert data.augmented_labels("minority") == [1]
    assert data.augmented_labels("all") == [0, 1] and data.augmented_labels("none") == []


def test_balanced_sampler_draws_both_classes_about_equally(tmp_path: Path) -> None:
    data = data_module(write_prepared_dataset(tmp_path), balance="sampler", seed=3)

    labels = torch.cat([batch[2] for _ in range(25) for batch in data.train_dataloader()])

    assert data.class_weights() is None
    assert 0.4 < labels.float().mean().item() < 0.6  # 1 in 4 without the sampler


def test_augmentation_changes_only_the_chosen_class_and_stays_in_range() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 32, 32, generator=generator).half()
    labels = torch.tensor([0, 1, 0, 1, 1, 0])

    augmented = augment_labels(images, labels, chosen=[1])

    assert augmented.dtype == images.dtype and augmented.shape == images.shape
    assert torch.equal(augmented[labels == 0], images[labels == 0])
    for row in (1, 3, 4):
        assert not torch.equal(augmented[row], images[row])
    assert float(augmented.min()) >= 0.0 and float(augmented.max()) <= 1.0


def test_augmentation_is_light() -> None:
    generator = torch.Generator().manual_seed(1)
    smooth = torch.linspace(0, 1, 64).repeat(64, 1).view(1, 1, 64, 64).repeat(8, 1, 1, 1)

    augmented = augment_batch(smooth, generator=generator)

    # Flipped or not, every image stays close to the original or its mirror image.
    distance = torch.minimum((augmented - smooth).abs().mean(dim=(1, 2, 3)),
                             (augmented - smooth.flip(-1)).abs().mean(dim=(1, 2, 3)))
    assert float(distance.max()) < 0.1
