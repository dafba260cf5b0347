"""Lightning training of the network: freeze phases, checkpoints and inference from a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

from models.backbone import IMAGENET_WEIGHTS_SHA256
from models.module import CheckpointError, OsteoModule, load_model, predict
from tasks.train import (
    TrainSettings,
    build_module,
    build_trainer,
    configure_runtime,
    keep_determinism_flag,
    quiet_lightning,
)
from tests.models.test_data import data_module, write_prepared_dataset


def tiny_params(**train: Any) -> dict[str, Any]:
    """``train`` and ``model`` blocks for 64 px images, 24 samples, batches of 8."""
    settings = {
        "seed": 11, "batch_size": 8, "max_epochs": 1, "freeze_epochs": 0, "unfreeze_from": 15,
        "lr_head": 1e-3, "lr_backbone": 1e-3, "weight_decay": 1e-4, "patience": 3,
        "num_workers": 0, "threads": None, "balance": "weighted_loss", "augment": "all",
        "monitor": "val_auc",
    }
    model = {"weights_path": None, "weights_sha256": IMAGENET_WEIGHTS_SHA256, "dropout": 0.2}
    return {"train": settings | train, "model": model}


class FeatureSnapshots(L.Callback):
    """Copies of the network's parameters and statistics at the start and after each epoch."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, torch.Tensor]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_train_epoch_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = pl_module.net.state_dict()  # type: ignore[union-attr]
        self.epochs.append({name: value.clone() for name, value in state.items()})


def fit(tmp_path: Path, callbacks: tuple[L.Callback, ...] = (), **train: Any) -> OsteoModule:
    settings = TrainSettings.from_params(tiny_params(**train))
    configure_runtime(settings.seed)
    data = data_module(write_prepared_dataset(tmp_path / "project"))
    module = build_module(settings, data)
    with keep_determinism_flag():
        trainer, _, _ = build_trainer(settings, tmp_path / "scratch", callbacks)
        with quiet_lightning():
            trainer.fit(module, datamodule=data)
    return module


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], blocks: range) -> bool:
    prefixes = tuple(f"features.{block}." for block in blocks)
    return any(not torch.equal(before[name], after[name]) for name in before
               if name.startswith(prefixes))


def test_backbone_stays_frozen_during_freeze_epochs_then_unfreezes_from_the_index(
    tmp_path: Path,
) -> None:
    snapshots = FeatureSnapshots()

    fit(tmp_path, (snapshots,), max_epochs=2, freeze_epochs=1, unfreeze_from=15)

    initial, head_only, unfrozen = snapshots.epochs
    assert not changed(initial, head_only, range(19))
    assert not torch.equal(initial["head.weight"], head_only["head.weight"])
    assert not changed(head_only, unfrozen, range(15))
    assert changed(head_only, unfrozen, range(15, 19))


def test_reloaded_checkpoint_predicts_exactly_like_the_trained_network(tmp_path: Path) -> None:
    module = fit(tmp_path)
    checkpoint = tmp_path / "model.ckpt"
    module.trainer.save_checkpoint(checkpoint, weights_only=True)
    rng = np.random.default_rng(5)
    images = rng.random((6, 64, 64)).astype(np.float16)
    age, sex, bmi = [55, 60, 65, 70, 75, 80], ["F", "M"] * 3, [20, 22, 24, 26, 28, 30]

    net, hparams = load_model(checkpoint)

    expected = predict(module.net.cpu(), images, age, sex, bmi)
    assert np.array_equal(predict(net, images, age, sex, bmi), expected)
    assert hparams["weights_sha256"] == IMAGENET_WEIGHTS_SHA256
    assert hparams["clinical_stats"] == module.net.stats.as_dict()


def test_prediction_refuses_images_of_another_size(tmp_path: Path) -> None:
    module = OsteoModule(
        clinical_stats={"age_mean": 60.0, "age_std": 10.0, "bmi_mean": 25.0, "bmi_std": 4.0},
        image_size=64, pretrained=False,
    )

    with pytest.raises(ValueError, match="trained on 64 x 64"):
        predict(module.net, np.zeros((1, 32, 32), np.float32), [60], ["F"], [25])


def test_checkpoint_holding_code_is_refused(tmp_path: Path) -> None:
    forged = tmp_path / "model.ckpt"
    torch.save({"hyper_parameters": {}, "state_dict": {}, "callback": FeatureSnapshots()}, forged)

    with pytest.raises(CheckpointError, match="refused"):
        load_model(forged)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "absent.ckpt")
