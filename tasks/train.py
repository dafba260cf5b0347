"""Train stage: fine-tune the pre-trained CNN with the patients' data on the prepared dataset.

Section 2.7 of the report, "model training, model testing and optimisation": the MobileNetV2
pre-trained on ImageNet, with age, sex and BMI fused before the affine layer (figure 7,
``models.fusion``), is re-trained on the train split; the validation split chooses the epoch
(early stopping and best checkpoint, by ``train.monitor``); the test split is only predicted,
for the evaluate stage.

Reads ``data/prepared/records.parquet``, ``data/prepared/pixels/shard-*.npz`` and
``data/split/split.parquet`` (local files, pulled by DVC), and the pre-trained weights file.
Writes, under ``data/model/``:

``model.ckpt``         the best checkpoint (Lightning format, weights and hyperparameters:
                       standardisation statistics, image size, pre-trained weights SHA-256);
``train_log.csv``      losses, validation AUC and learning rates per epoch (CSVLogger);
``predictions.parquet`` image_id, patient_id, split (val, test), sex, label (0/1) and
                       probability (P(osteoporosis)) of the best checkpoint, reloaded from disk;

and ``reports/train.json`` (images per split, best epoch, duration, throughput).

Implements control 4.3 (pre-trained weights verified against a pinned SHA-256 before loading,
``models.backbone``) and supports control 4.22: only pseudonymous ids, age, sex, BMI, labels
and pixels are read, and the model stores aggregates only.

The run is seeded (``train.seed``) and deterministic on the CPU; it uses every CPU core
available to the process and a GPU when one is present.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from prefect import task

from models.backbone import FEATURE_BLOCKS
from models.data import AUGMENT_MODES, BALANCE_MODES, SPLITS, RadiographDataModule
from models.module import (
    BackboneFreeze,
    EpochLog,
    OsteoModule,
    configure_cpu,
    load_model,
    predict,
)
from osteo.config import ConfigError
from osteo.layout import Layout
from osteo.summary import StageSummary

logger = logging.getLogger(__name__)

MODEL_DIR = Path("data/model")
CHECKPOINT = MODEL_DIR / "model.ckpt"
TRAIN_LOG = MODEL_DIR / "train_log.csv"
PREDICTIONS = MODEL_DIR / "predictions.parquet"
PREDICTION_COLUMNS = ("image_id", "patient_id", "split", "sex", "label", "probability")
MONITORS = {"val_auc": "max", "val_loss": "min"}
EPOCH_COLUMNS = ("epoch", "train_loss", "val_loss", "val_auc", "lr_head", "lr_backbone")
LEARNING_RATE_COLUMNS = {"lr-AdamW/pg1": "lr_head", "lr-AdamW/pg2": "lr_backbone"}

# Warnings that do not apply to this training, silenced by message (others still show):
KNOWN_WARNINGS = (
    # worker processes would only copy an in-memory dataset (train.num_workers: 0)
    r"The '\w+_dataloader' does not have many workers",
    # frozen backbone blocks are in eval mode on purpose (fixed batch-norm statistics)
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # Lightning's own use of a torch API deprecated in the torch release pinned here
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)

__all__ = ["TrainResult", "TrainSettings", "load_model", "predict", "train"]


@dataclass(frozen=True)
class TrainSettings:
    """The ``train`` and ``model`` blocks of ``params.yaml``, checked."""

    seed: int
    batch_size: int
    max_epochs: int
    freeze_epochs: int
    unfreeze_from: int | None
    lr_head: float
    lr_backbone: float
    weight_decay: float
    patience: int
    num_workers: int
    threads: int | None
    balance: str
    augment: str
    monitor: str
    weights_path: str | None
    weights_sha256: str
    dropout: float

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainSettings:
        """Read and check the settings.

        Raises:
            ConfigError: when a key is missing or a value is out of range; the message names
                the key.
        """
        train, model = params.get("train") or {}, params.get("model") or {}
        values = {**{key: train.get(key, _MISSING) for key in _TRAIN_KEYS},
                  **{key: model.get(key, _MISSING) for key in _MODEL_KEYS}}
        missing = [_qualified(key) for key, value in values.items() if value is _MISSING]
        if missing:
            raise ConfigError(f"params.yaml: {', '.join(missing)} missing")
        try:
            settings = cls(**values)
        except TypeError as error:  # a programming error: the field list and the keys differ
            raise AssertionError(error) from error
        settings.check()
        return settings

    def check(self) -> None:
        """Raise ConfigError for a value out of range."""
        problems = {
            "train.balance": self.balance not in BALANCE_MODES,
            "train.augment": self.augment not in AUGMENT_MODES,
            "train.monitor": self.monitor not in MONITORS,
            "train.batch_size": self.batch_size < 2,
            "train.max_epochs": self.max_epochs < 1,
            "train.freeze_epochs": self.freeze_epochs < 0,
            "train.unfreeze_from": self.unfreeze_from is not None
            and not 0 <= self.unfreeze_from <= FEATURE_BLOCKS,
            "train.patience": self.patience < 1,
            "train.num_workers": self.num_workers < 0,
            "train.threads": self.threads is not None and self.threads < 1,
            "model.dropout": not 0.0 <= self.dropout < 1.0,
        }
        bad = [key for key, wrong in problems.items() if wrong]
        if bad:
            raise ConfigError(
                f"params.yaml: unusable value for {', '.join(bad)} (balance: "
                f"{'|'.join(BALANCE_MODES)}; augment: {'|'.join(AUGMENT_MODES)}; monitor: "
                f"{'|'.join(MONITORS)}; unfreeze_from: "
                f"0..{FEATURE_BLOCKS} or null; threads >= 1 or null; batch_size >= 2; "
                "dropout in [0, 1))"
            )


_MISSING = object()
_TRAIN_KEYS = ("seed", "batch_size", "max_epochs", "freeze_epochs", "unfreeze_from", "lr_head",
               "lr_backbone", "weight_decay", "patience", "num_workers", "threads", "balance",
               "augment", "monitor")
_MODEL_KEYS = ("weights_path", "weights_sha256", "dropout")


def _qualified(key: str) -> str:
    return f"model.{key}" if key in _MODEL_KEYS else f"train.{key}"


@dataclass(frozen=True)
class TrainResult:
    """What the train stage produced.

    Attributes:
        checkpoint: the best checkpoint, ``data/model/model.ckpt``.
        best_epoch: epoch of that checkpoint, counted from 1 as in ``train_log.csv``.
        monitor: the validation metric that chose it (``val_auc`` or ``val_loss``).
        best_metric: its value at the best epoch.
        seconds: wall time of the stage.
        images_per_second: training images through forward, backward and optimiser step per
            second of step time.
    """

    checkpoint: Path
    best_epoch: int
    monitor: str
    best_metric: float
    seconds: float
    images_per_second: float


@task(name="train")
def train(layout: Layout, params: dict[str, Any]) -> TrainResult:
    """Fine-tune the network, keep the best checkpoint and predict the val and test splits.

    Args:
        layout: paths of the project.
        params: ``params.yaml`` (blocks ``train`` and ``model``).

    Returns:
        The checkpoint path and the figures of the run.

    Raises:
        ConfigError: when a ``train.*`` or ``model.*`` setting is missing or unusable.
        TrainingDataError: when the prepared dataset or the split cannot be trained on.
        WeightsIntegrityError: when the pre-trained weights are not the pinned file.
    """
    started = time.perf_counter()
    settings = TrainSettings.from_params(params)
    out_dir = layout.root / MODEL_DIR

    # 1. Seed, threads, and the dataset in memory.
    threads = configure_runtime(settings.seed, settings.threads)
    data = RadiographDataModule(
        layout.prepared_records, layout.prepared_pixel_dir, layout.split_table,
        batch_size=settings.batch_size, num_workers=settings.num_workers,
        balance=settings.balance, seed=settings.seed,
    )
    data.setup("fit")

    # 2. The network from the verified pre-trained weights.
    module = build_module(settings, data)
    logger.info("training on %s with %d CPU threads: %d epochs max, head only for %d",
                _device_name(), threads, settings.max_epochs, settings.freeze_epochs)

    # 3. Fit in a scratch directory; keep the best checkpoint and the log.
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="osteo-train-") as scratch, keep_determinism_flag():
        trainer, checkpointing, epoch_log = build_trainer(settings, Path(scratch))
        with quiet_lightning():
            trainer.fit(module, datamodule=data)
        shutil.copyfile(checkpointing.best_model_path, layout.root / CHECKPOINT)
        epoch_table(Path(scratch) / "metrics.csv").to_csv(layout.root / TRAIN_LOG, index=False)
    best_epoch = 1 + int(torch.load(layout.root / CHECKPOINT, map_location="cpu",
                                    weights_only=True)["epoch"])

    # 4. Predictions of the checkpoint as written, reloaded from disk.
    net, _ = load_model(layout.root / CHECKPOINT)
    predictions = predict_splits(net, data, ("val", "test"))
    predictions.to_parquet(layout.root / PREDICTIONS, index=False)

    # 5. Result and summary.
    result = TrainResult(
        checkpoint=layout.root / CHECKPOINT, best_epoch=best_epoch, monitor=settings.monitor,
        best_metric=_score(checkpointing.best_model_score),
        seconds=round(time.perf_counter() - started, 1),
        images_per_second=round(epoch_log.images_per_second, 1),
    )
    write_summary(layout, data, result)
    logger.info("train: best %s %.4f at epoch %d, %.1f images/s, %.0f s; model in %s",
                result.monitor, result.best_metric, result.best_epoch,
                result.images_per_second, result.seconds, CHECKPOINT)
    return result


# ---------------------------------------------------------------- building blocks


def configure_runtime(seed: int, threads: int | None = None) -> int:
    """Seed every generator and set the CPU threads (None: every core given to the process).

    Returns:
        The number of CPU threads.
    """
    threads = configure_cpu(threads)
    L.seed_everything(seed, workers=True, verbose=False)
    return threads


def build_module(settings: TrainSettings, data: RadiographDataModule) -> OsteoModule:
    """The LightningModule with the train split's statistics and class balance."""
    return OsteoModule(
        clinical_stats=data.clinical_stats().as_dict(),
        image_size=data.image_size,
        class_weights=data.class_weights(),
        augment_labels=data.augmented_labels(settings.augment),
        dropout=settings.dropout,
        lr_head=settings.lr_head,
        lr_backbone=settings.lr_backbone,
        weight_decay=settings.weight_decay,
        max_epochs=settings.max_epochs,
        weights_path=settings.weights_path,
        weights_sha256=settings.weights_sha256,
    )


def build_trainer(
    settings: TrainSettings, scratch: Path, extra_callbacks: tuple[L.Callback, ...] = ()
) -> tuple[L.Trainer, ModelCheckpoint, EpochLog]:
    """A Trainer with fine-tuning, early stopping, best checkpoint and CSV log in ``scratch``.

    Args:
        settings: the train settings.
        scratch: directory for the run's checkpoints and ``metrics.csv``.
        extra_callbacks: further callbacks (tests use them to observe the run).

    Returns:
        The trainer, its checkpoint callback and its epoch log.
    """
    mode = MONITORS[settings.monitor]
    checkpointing = ModelCheckpoint(dirpath=scratch / "checkpoints", filename="best",
                                    monitor=settings.monitor, mode=mode, save_top_k=1,
                                    save_weights_only=True)
    epoch_log = EpochLog()
    callbacks = [
        BackboneFreeze(settings.freeze_epochs, settings.unfreeze_from),
        EarlyStopping(monitor=settings.monitor, mode=mode, patience=settings.patience),
        checkpointing, epoch_log, LearningRateMonitor(logging_interval="epoch"),
        *extra_callbacks,
    ]
    with quiet_lightning():
        trainer = L.Trainer(
            accelerator="auto", devices=1, max_epochs=settings.max_epochs,
            callbacks=callbacks, logger=CSVLogger(scratch, name="", version=""),
            default_root_dir=scratch, num_sanity_val_steps=0, log_every_n_steps=1,
            enable_model_summary=False, enable_progress_bar=sys.stderr.isatty(),
            # Limitation: deterministic kernels are requested on the CPU only; on a GPU some
            # cuDNN kernels have no deterministic version, so GPU runs may differ slightly.
            deterministic=not torch.cuda.is_available(),
        )
    return trainer, checkpointing, epoch_log


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's start-up chatter and known advice that does not apply here.

    Hardware lines ("GPU available: ...") and tips are INFO messages of Lightning's
    ``rank_zero`` logger; the data loader worker advice is a warning that does not apply to an
    in-memory dataset loaded in the training process. Other warnings still show.
    """
    chatty = [logging.getLogger(name) for name in (
        "lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")]
    levels = [log.level for log in chatty]
    for log in chatty:
        log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in KNOWN_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for log, level in zip(chatty, levels, strict=True):
            log.setLevel(level)


@contextmanager
def keep_determinism_flag() -> Iterator[None]:
    """Restore torch's deterministic-algorithms flag, which the Trainer sets process-wide."""
    enabled = torch.are_deterministic_algorithms_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled)


def _score(value: torch.Tensor | None) -> float:
    return float(value) if value is not None else float("nan")


def _device_name() -> str:
    return "GPU" if torch.cuda.is_available() else "CPU"


# ---------------------------------------------------------------- outputs


def predict_splits(
    net: Any, data: RadiographDataModule, splits: tuple[str, ...]
) -> pd.DataFrame:
    """The predictions table (``PREDICTION_COLUMNS``) of the given splits."""
    frames = []
    for name in splits:
        split = data.splits[name]
        clinical = split.clinical.numpy()
        sexes = split.records["sex"].tolist()
        probability = predict(net, split.images, clinical[:, 0], sexes, clinical[:, 2])
        frames.append(split.records.assign(split=name, probability=probability))
    table = pd.concat(frames, ignore_index=True)
    table["label"] = table["label"].astype("int64")
    return table[list(PREDICTION_COLUMNS)]


def epoch_table(metrics_csv: Path) -> pd.DataFrame:
    """One row per epoch from the CSVLogger's file, which writes each logging call's values on
    rows of their own: epoch (from 1), train_loss, val_loss, val_auc, lr_head, lr_backbone."""
    raw = pd.read_csv(metrics_csv).rename(columns=LEARNING_RATE_COLUMNS)
    # The learning rates are logged at the start of an epoch, on rows without an epoch number.
    raw["epoch"] = raw["epoch"].bfill()
    columns = [name for name in EPOCH_COLUMNS if name in raw.columns]
    table = raw.dropna(subset=["epoch"]).groupby("epoch", sort=True).first().reset_index()
    table["epoch"] = table["epoch"].astype("int64") + 1  # Lightning counts from 0
    return table[columns]


def write_summary(layout: Layout, data: RadiographDataModule, result: TrainResult) -> None:
    """``reports/train.json``: images per split and the figures of the run."""
    images = {name: len(data.splits[name]) for name in SPLITS}
    summary = StageSummary(
        stage="train", records_in=sum(images.values()), accepted=sum(images.values()),
        outputs={"checkpoint": str(CHECKPOINT), "train_log": str(TRAIN_LOG),
                 "predictions": str(PREDICTIONS)},
        extra={"images": images, "train_class_counts": data.class_counts(),
               "best_epoch": result.best_epoch, "monitor": result.monitor,
               "best_metric": result.best_metric, "seconds": result.seconds,
               "images_per_second": result.images_per_second},
    )
    summary.write(layout.summary("train"))
