"""The train stage end to end on a tiny prepared dataset: checkpoint, log and predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from models.backbone import IMAGENET_WEIGHTS_SHA256, WeightsIntegrityError
from osteo.config import ConfigError
from osteo.layout import Layout
from osteo.shards import read_shard
from tasks.train import CHECKPOINT, PREDICTIONS, TRAIN_LOG, TrainResult, load_model, predict, train
from tests.models.test_data import write_prepared_dataset
from tests.models.test_module import tiny_params

CONTRACT_COLUMNS = ["image_id", "patient_id", "split", "sex", "label", "probability"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, TrainResult]:
    """One epoch of training on 24 images of 64 px, shared by the tests of this module."""
    layout = write_prepared_dataset(tmp_path_factory.mktemp("project"))
    return layout, train.fn(layout, tiny_params())


def test_one_epoch_writes_checkpoint_log_and_predictions_of_the_contract(
    trained: tuple[Layout, TrainResult],
) -> None:
    layout, result = trained
    predictions = pd.read_parquet(layout.root / PREDICTIONS)
    split = pd.read_parquet(layout.split_table)

    assert result.checkpoint == layout.root / CHECKPOINT and result.checkpoint.is_file()
    assert result.best_epoch == 1 and result.monitor == "val_auc"
    assert 0.0 <= result.best_metric <= 1.0 and result.images_per_second > 0
    assert list(predictions.columns) == CONTRACT_COLUMNS
    held_out = split[split["split"].isin(["val", "test"])]
    assert sorted(predictions["image_id"]) == sorted(held_out["image_id"])
    assert predictions["label"].dtype == np.int64 and set(predictions["label"]) == {0, 1}
    assert predictions["probability"].between(0.0, 1.0).all()
    assert set(predictions["sex"]) == {"F", "M"}
    log = pd.read_csv(layout.root / TRAIN_LOG)
    assert list(log["epoch"]) == [1] and {"train_loss", "val_loss", "val_auc"} <= set(log.columns)
    summary = json.loads(layout.summary("train").read_text())
    assert summary["extra"]["images"] == {"train": 16, "val": 4, "test": 4}


def test_checkpoint_holds_train_statistics_and_the_weights_checksum(
    trained: tuple[Layout, TrainResult],
) -> None:
    layout, result = trained
    records = pd.read_parquet(layout.prepared_records)
    split = pd.read_parquet(layout.split_table)
    train_ages = records.loc[split["split"].to_numpy() == "train", "age"]

    hparams = torch.load(result.checkpoint, weights_only=True)["hyper_parameters"]

    assert hparams["weights_sha256"] == IMAGENET_WEIGHTS_SHA256
    assert hparams["clinical_stats"]["age_mean"] == pytest.approx(train_ages.mean())
    assert hparams["image_size"] == 64


def test_predictions_file_is_reproduced_from_the_checkpoint_and_the_images(
    trained: tuple[Layout, TrainResult],
) -> None:
    layout, result = trained
    written = pd.read_parquet(layout.root / PREDICTIONS)
    records = pd.read_parquet(layout.prepared_records).set_index("image_id")
    rows = records.loc[written["image_id"]]
    stored = []
    for row in rows.itertuples():
        with read_shard(layout.prepared_pixel_dir / row.shard) as shard:
            stored.append(shard[row.member])
    images = np.stack(stored)

    net, _ = load_model(result.checkpoint)
    again = predict(net, images, rows["age"].tolist(), rows["sex"].tolist(), rows["bmi"].tolist())

    np.testing.assert_array_equal(again, written["probability"].to_numpy())


def test_missing_setting_is_named(tmp_path: Path) -> None:
    params = tiny_params()
    del params["train"]["lr_head"]

    with pytest.raises(ConfigError, match=r"train\.lr_head missing"):
        train.fn(Layout(tmp_path), params)


def test_unusable_setting_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.balance"):
        train.fn(Layout(tmp_path), tiny_params(balance="oversample"))


def test_unpinned_weights_stop_training_before_any_model_is_written(tmp_path: Path) -> None:
    layout = write_prepared_dataset(tmp_path)
    params = tiny_params()
    params["model"]["weights_sha256"] = "0" * 64

    with pytest.raises(WeightsIntegrityError, match="refusing to load"):
        train.fn(layout, params)
    assert not (layout.root / CHECKPOINT).parent.exists()


def test_sampler_with_minority_augmentation_trains_without_class_weights(tmp_path: Path) -> None:
    layout = write_prepared_dataset(tmp_path)

    result = train.fn(layout, tiny_params(balance="sampler", augment="minority",
                                          monitor="val_loss"))

    hparams = torch.load(result.checkpoint, weights_only=True)["hyper_parameters"]
    assert hparams["class_weights"] is None and hparams["augment_labels"] == [1]
    assert result.monitor == "val_loss" and result.best_metric > 0
