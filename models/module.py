"""Training and inference of the osteoporosis network with PyTorch Lightning.

Fine-tuning follows section 2.7 of the report: the CNN pre-trained on ImageNet is re-trained
on a small dataset, the head first, then the last backbone blocks:

1. for ``train.freeze_epochs`` epochs the whole backbone is frozen and only the head (the
   affine layer over image features, age, sex and BMI) learns;
2. from then on the backbone blocks from ``train.unfreeze_from`` to the last learn as well,
   with their own, smaller learning rate (``BackboneFreeze`` callback).

Optimisation: AdamW with two parameter groups (head at ``train.lr_head``, backbone at
``train.lr_backbone``), both decayed along a cosine over ``train.max_epochs`` epochs. The loss
is the cross-entropy, class-weighted when ``train.balance`` is ``weighted_loss``; training
batches are augmented as ``train.augment`` says (``models.data``).

``load_model`` and ``predict`` are the inference side used by evaluation and monitoring: they
need only the checkpoint (no pre-trained weights file, no Lightning trainer).

Implements control 4.3 (pre-trained weights checked, see ``models.backbone``; checkpoints read
with ``torch.load(weights_only=True)``) and records the SHA-256 of the pre-trained weights in
the checkpoint's hyperparameters for the model's documentation (control 4.2).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch.optim import AdamW
from torch.optim.lr_scheduler import CosineAnnealingLR
from torchmetrics.classification import BinaryAUROC

from models.backbone import IMAGENET_WEIGHTS_SHA256, MobileNetV2, imagenet_mobilenet_v2
from models.data import augment_labels
from models.fusion import ClinicalStats, OsteoNet, clinical_matrix

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class CheckpointError(Exception):
    """A model checkpoint is missing or is not an osteo checkpoint; the message names the file."""


class OsteoModule(L.LightningModule):
    """The ``OsteoNet`` with its loss, metrics and optimiser.

    Every argument is saved in the checkpoint's hyperparameters.

    Args:
        clinical_stats: ``ClinicalStats.as_dict()`` of the train split.
        image_size: side of the prepared images, pixels.
        class_weights: cross-entropy weights ``[normal, osteoporosis]``, or None.
        augment_labels: classes whose training images are augmented (``[0, 1]``: all).
        dropout: dropout on the fused vector before the affine layer.
        lr_head: learning rate of the affine layer.
        lr_backbone: learning rate of the unfrozen backbone blocks.
        weight_decay: AdamW weight decay.
        max_epochs: length of the cosine learning-rate decay, epochs.
        weights_path: pre-trained weights file; None for the packaged ImageNet file.
        weights_sha256: pinned SHA-256 of that file.
        pretrained: load the pre-trained weights (False when a checkpoint will replace them).
    """

    class_weight: torch.Tensor | None

    def __init__(
        self,
        clinical_stats: dict[str, float],
        image_size: int,
        class_weights: list[float] | None = None,
        augment_labels: list[int] | None = None,
        dropout: float = 0.2,
        lr_head: float = 1e-3,
        lr_backbone: float = 1e-4,
        weight_decay: float = 1e-4,
        max_epochs: int = 10,
        weights_path: str | None = None,
        weights_sha256: str = IMAGENET_WEIGHTS_SHA256,
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        backbone = (imagenet_mobilenet_v2(Path(weights_path) if weights_path else None,
                                          weights_sha256) if pretrained else MobileNetV2())
        self.net = OsteoNet(ClinicalStats(**clinical_stats), dropout, backbone, image_size)
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weight", weight, persistent=False)
        self.val_auc = BinaryAUROC()

    def forward(self, images: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(images, clinical)
        return logits

    def training_step(self, batch: Batch, batch_index: int) -> torch.Tensor:
        images, clinical, labels = batch

        # 1. Derivative images (see train.augment).
        images = augment_labels(images, labels, self.hparams["augment_labels"] or [])

        # 2. Forward pass and class-weighted loss.
        loss = F.cross_entropy(self(images, clinical), labels, weight=self.class_weight)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: Batch, batch_index: int) -> None:
        images, clinical, labels = batch
        logits = self(images, clinical)
        loss = F.cross_entropy(logits, labels, weight=self.class_weight)
        self.val_auc.update(torch.softmax(logits, dim=1)[:, 1], labels)
        self.log("val_loss", loss, on_epoch=True, batch_size=len(labels))
        self.log("val_auc", self.val_auc, on_epoch=True)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """AdamW on the head and the backbone (frozen parameters get no gradient and no step)."""
        optimiser = AdamW(
            [{"params": self.net.head.parameters(), "lr": self.hparams["lr_head"]},
             {"params": self.net.features.parameters(), "lr": self.hparams["lr_backbone"]}],
            weight_decay=self.hparams["weight_decay"],
        )
        schedule = CosineAnnealingLR(optimiser, T_max=max(1, self.hparams["max_epochs"]))
        return {"optimizer": optimiser, "lr_scheduler": {"scheduler": schedule,
                                                         "interval": "epoch"}}


# ---------------------------------------------------------------- callbacks


class BackboneFreeze(L.Callback):
    """Head only for ``freeze_epochs`` epochs, then backbone blocks ``unfreeze_from`` onwards.

    The state is derived from the epoch number at each epoch start, so a resumed run lands in
    the right phase.

    Args:
        freeze_epochs: epochs during which the whole backbone is frozen.
        unfreeze_from: first backbone block fine-tuned afterwards (0 .. 19; 19 or None keeps
            the backbone frozen for the whole run).
    """

    def __init__(self, freeze_epochs: int, unfreeze_from: int | None) -> None:
        self.freeze_epochs, self.unfreeze_from = freeze_epochs, unfreeze_from

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net: OsteoNet = pl_module.net  # type: ignore[assignment]
        wanted = None if trainer.current_epoch < self.freeze_epochs else self.unfreeze_from
        if net.trainable_from == wanted:
            return
        net.set_trainable_from(wanted)
        learning = "head only" if wanted is None else f"head and backbone blocks {wanted}+"
        logger.info("epoch %d: training %s", trainer.current_epoch + 1, learning)


class EpochLog(L.Callback):
    """One log line per epoch (losses, AUC, duration) and the training throughput.

    ``images_per_second`` counts images through training steps (forward, backward, optimiser)
    over the time spent in those steps; loading and validation are excluded.
    """

    def __init__(self) -> None:
        self.images = 0
        self.step_seconds = 0.0
        self._batch_start = 0.0
        self._epoch_start = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.step_seconds if self.step_seconds else 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Batch, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: object, batch: Batch, batch_idx: int) -> None:
        self.step_seconds += time.perf_counter() - self._batch_start
        self.images += len(batch[2])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        figures = ", ".join(f"{name} {metrics[name]:.4f}" for name in
                            ("train_loss", "val_loss", "val_auc") if name in metrics)
        logger.info("epoch %d/%d: %s (%.1f s)", trainer.current_epoch + 1, trainer.max_epochs,
                    figures, time.perf_counter() - self._epoch_start)


# ---------------------------------------------------------------- inference


def configure_cpu(threads: int | None = None) -> int:
    """Prepare the process for CPU work on the network; returns the thread count.

    Subnormal floats are flushed to zero: the ImageNet weights hold a few dozen subnormal
    values, and CPU kernels slow down by an order of magnitude on them, without any effect on
    the results at float32 precision.

    Args:
        threads: intra-op threads; None for every core available to the process.
    """
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        threads = threads or os.cpu_count() or 1
    torch.set_num_threads(max(1, threads))
    torch.set_flush_denormal(True)
    return torch.get_num_threads()



def load_model(checkpoint: Path) -> tuple[OsteoNet, dict[str, Any]]:
    """Rebuild the trained network from a checkpoint, without the pre-trained weights file.

    Args:
        checkpoint: a Lightning checkpoint written by the train stage.

    Subnormal floats are flushed to zero in the process (see ``configure_cpu``).

    Returns:
        The network in eval mode on the CPU, and the checkpoint's hyperparameters
        (standardisation statistics, image size, pre-trained weights SHA-256, ...).

    Raises:
        CheckpointError: when the file is missing, holds anything other than tensors and
            plain values, or is not an osteo checkpoint.
    """
    if not Path(checkpoint).is_file():
        raise CheckpointError(f"model checkpoint {checkpoint} not found")
    try:
        content = torch.load(checkpoint, map_location="cpu", weights_only=True)
        hparams = dict(content["hyper_parameters"])
        state = {name.removeprefix("net."): tensor
                 for name, tensor in content["state_dict"].items() if name.startswith("net.")}
        net = OsteoNet(ClinicalStats(**hparams["clinical_stats"]), hparams["dropout"],
                       image_size=hparams["image_size"])
        net.load_state_dict(state, strict=True)
    except (KeyError, TypeError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{checkpoint} is not an osteo model checkpoint") from error
    except Exception as error:  # the restricted unpickler raises several types
        raise CheckpointError(f"{checkpoint} holds more than tensors; refused") from error
    torch.set_flush_denormal(True)
    return net.eval(), hparams


def predict(
    model: OsteoNet,
    images: np.ndarray | torch.Tensor,
    age: Sequence[float] | np.ndarray,
    sex: Sequence[str],
    bmi: Sequence[float] | np.ndarray,
    batch_size: int = 64,
) -> np.ndarray:
    """P(osteoporosis) of each image given its patient's age, sex and BMI.

    Args:
        model: a network from ``load_model`` (or a trained ``OsteoModule.net``).
        images: ``(N, size, size)`` or ``(N, 1, size, size)`` grey images in ``[0, 1]``, as in
            ``data/prepared``.
        age: ages in years, one per image.
        sex: ``F`` or ``M``, one per image.
        bmi: body-mass indices, one per image.
        batch_size: images per forward pass.

    Returns:
        ``(N,)`` float64 probabilities.

    Raises:
        ValueError: when the lengths differ, a sex is not ``F``/``M`` or the image size is
            not the one the model was trained on.
    """
    pixels = torch.as_tensor(images)
    clinical = torch.from_numpy(clinical_matrix(age, sex, bmi))
    if len(pixels) != len(clinical):
        raise ValueError(f"{len(pixels)} images but {len(clinical)} clinical rows")
    if model.image_size is not None and tuple(pixels.shape[-2:]) != (model.image_size,) * 2:
        raise ValueError(f"images are {tuple(pixels.shape[-2:])} px, the model was trained on "
                         f"{model.image_size} x {model.image_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            stop = start + batch_size
            probability = model.probabilities(pixels[start:stop].to(device),
                                              clinical[start:stop].to(device))[:, 1]
            chunks.append(probability.double().cpu())
    model.train(was_training)
    return torch.cat(chunks).numpy() if chunks else np.empty(0, dtype=np.float64)
