"""Training data: the prepared images, their patients' data and labels, held in memory by split.

Reads ``data/prepared/records.parquet`` (image_id, patient_id, age, sex, bmi, label, and the
shard and member name of each image), ``data/prepared/pixels/shard-*.npz`` (float16 ``[0, 1]``
images, size x size) and
``data/split/split.parquet`` (image_id, patient_id, split). The dataset of a medical practice is
small (a thousand images of 224 x 224 px take 100 MB in float16), so every shard is read once
into one tensor per split instead of reopening shards per item.

Class balance (section 2.7: "normal" and "osteoporosis" images should be equally represented),
chosen by ``train.balance``:

``weighted_loss``  every training image once per epoch; the cross-entropy weighs each class by
                   ``n / (2 * n_class)`` so both classes count equally.
``sampler``        images drawn with replacement, each class with probability 1/2; the loss is
                   unweighted, and minority images are seen several times per epoch.

Light augmentation of training images (``augment_batch``: horizontal flip, small rotation,
scale and shift, brightness and contrast) is chosen by ``train.augment``:

``all``       every training image (default). Augmenting one class only would let the network
              learn the augmentation's own signature (interpolation smoothing, repeated border
              pixels) as a marker of that class, a shortcut that fails on real images.
``minority``  the train split's less frequent class only, the literal reading of section 2.7
              ("transforming real osteoporosis X-rays to create derivative images").
``none``      no augmentation.

With the ``sampler``, repeated minority images then differ from each other. Validation and test
images are never augmented.

Supports control 4.22, minimise data at each step: only pseudonymous ids, age, sex, BMI, label
and pixels are read; no identity reaches training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from models.fusion import ClinicalStats, clinical_matrix
from osteo.shards import read_shard

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LABELS = {"normal": 0, "osteoporosis": 1}
BALANCE_MODES = ("weighted_loss", "sampler")
AUGMENT_MODES = ("all", "minority", "none")

# Light augmentation ranges: radiographs stay plausible (no vertical flip, no large rotation).
ROTATION_DEGREES = 5.0
SCALE_RANGE = 0.05
SHIFT_FRACTION = 0.03
BRIGHTNESS = 0.05
CONTRAST = 0.10


class TrainingDataError(Exception):
    """The prepared dataset cannot be trained on; the message names the file and the problem."""


@dataclass
class SplitTensors:
    """One split held in memory.

    Attributes:
        records: image_id, patient_id, sex, label (0/1) of each row, in tensor order.
        images: ``(N, 1, size, size)`` float16 in ``[0, 1]``.
        clinical: ``(N, 3)`` raw age, sex code (F=1, M=0), BMI.
        labels: ``(N,)`` int64, 1 = osteoporosis.
    """

    records: pd.DataFrame
    images: torch.Tensor
    clinical: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


class RadiographDataset(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Items ``(image, clinical, label)`` of one in-memory split."""

    def __init__(self, split: SplitTensors) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        split = self.split
        return split.images[index], split.clinical[index], split.labels[index]


# ---------------------------------------------------------------- reading the prepared dataset


def _read_table(path: Path, columns: set[str]) -> pd.DataFrame:
    if not path.is_file():
        raise TrainingDataError(f"{path} not found: run the preceding stages (or dvc pull)")
    table = pd.read_parquet(path)
    missing = columns - set(table.columns)
    if missing:
        raise TrainingDataError(f"{path} lacks the columns {', '.join(sorted(missing))}")
    return table


def read_labelled_records(records_path: Path, split_path: Path) -> pd.DataFrame:
    """Prepared records joined with their split, labels as 0/1, in the split table's order.

    Raises:
        TrainingDataError: when a file or column is missing, an image has no split (or the
            split names an unknown image), or a label or split value is unknown.
    """
    records = _read_table(records_path, {"image_id", "patient_id", "age", "sex", "bmi", "label",
                                         "shard", "member"})
    split = _read_table(split_path, {"image_id", "split"})

    # 1. Every prepared image has exactly one split and the split names no other image.
    without_split = set(records["image_id"]) - set(split["image_id"])
    unknown = set(split["image_id"]) - set(records["image_id"])
    if without_split or unknown:
        raise TrainingDataError(
            f"{split_path} does not match {records_path}: {len(without_split)} prepared images "
            f"have no split, {len(unknown)} split rows name no prepared image"
        )
    # The split table's row order (set by the images' content, not their pseudonyms) is the
    # order the model sees them in.
    joined = split[["image_id", "split"]].merge(records, on="image_id", how="left",
                                                validate="one_to_one")

    # 2. Known label and split values only.
    bad_labels = sorted(set(joined["label"]) - LABELS.keys())
    if bad_labels:
        raise TrainingDataError(f"{records_path}: unknown labels {', '.join(map(str, bad_labels))}")
    bad_splits = sorted(set(joined["split"]) - set(SPLITS))
    if bad_splits:
        raise TrainingDataError(f"{split_path}: unknown splits {', '.join(map(str, bad_splits))}")
    joined["label"] = joined["label"].map(LABELS).astype("int64")
    return joined


def load_pixels(pixel_dir: Path, records: pd.DataFrame) -> np.ndarray:
    """All images of ``records`` as one ``(N, 1, size, size)`` float16 array, in row order.

    Each shard is opened once.

    Raises:
        TrainingDataError: when a shard or an image is missing or images differ in size.
    """
    stack: np.ndarray | None = None
    positions = {image_id: row for row, image_id in enumerate(records["image_id"])}
    for shard_name, group in records.groupby("shard", sort=True):
        path = pixel_dir / str(shard_name)
        if not path.is_file():
            raise TrainingDataError(f"shard {path} not found (run preprocess or dvc pull)")
        with read_shard(path) as shard:
            for image_id, member in zip(group["image_id"], group["member"], strict=True):
                if member not in shard.files:
                    raise TrainingDataError(f"shard {path} lacks image {image_id} "
                                            f"(member {member})")
                pixels = shard[member]
                if stack is None:
                    stack = np.empty((len(records), 1, *pixels.shape), dtype=np.float16)
                if pixels.shape != stack.shape[2:]:
                    raise TrainingDataError(
                        f"shard {path}: image {image_id} is {pixels.shape}, "
                        f"expected {stack.shape[2:]}"
                    )
                stack[positions[image_id], 0] = pixels
    if stack is None:
        raise TrainingDataError(f"no prepared images in {pixel_dir}")
    return stack


def split_tensors(records: pd.DataFrame, pixels: np.ndarray) -> dict[str, SplitTensors]:
    """Cut the joined records and their pixels into the three splits."""
    clinical = clinical_matrix(records["age"].tolist(), records["sex"].tolist(),
                               records["bmi"].tolist())
    result = {}
    for name in SPLITS:
        rows = np.flatnonzero(records["split"].to_numpy() == name)
        result[name] = SplitTensors(
            records=records.iloc[rows][["image_id", "patient_id", "sex", "label"]]
            .reset_index(drop=True),
            images=torch.from_numpy(pixels[rows]),
            clinical=torch.from_numpy(clinical[rows]),
            labels=torch.from_numpy(records["label"].to_numpy()[rows].astype(np.int64)),
        )
    return result


# ---------------------------------------------------------------- augmentation


def augment_batch(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Light random augmentation of a batch of grey ``[0, 1]`` images, in torch.

    Per image: horizontal flip (p = 1/2), rotation within +-5 degrees, scale within +-5 %,
    shift within +-3 % of the side (border pixels repeated), brightness +-0.05 and contrast
    +-10 %, clipped to ``[0, 1]``.

    Args:
        images: ``(N, 1, H, W)`` float tensor.
        generator: CPU random generator (the global one when None, seeded by the trainer).

    Returns:
        A new tensor of the same shape and dtype.
    """
    n, device = images.shape[0], images.device
    angle = _uniform(n, ROTATION_DEGREES, generator, device) * math.pi / 180
    scale = 1 + _uniform(n, SCALE_RANGE, generator, device)
    flip = torch.where(_uniform(n, 1.0, generator, device) < 0, -1.0, 1.0)
    shift_x, shift_y = (_uniform(n, 2 * SHIFT_FRACTION, generator, device) for _ in range(2))
    contrast = 1 + _uniform(n, CONTRAST, generator, device).view(n, 1, 1, 1)
    brightness = _uniform(n, BRIGHTNESS, generator, device).view(n, 1, 1, 1)

    # 1. Affine grid: flip, rotation, scale and shift in one sampling (shifts are in the
    #    [-1, 1] coordinates of affine_grid, hence twice the fraction of the side).
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos * flip, -sin, shift_x], dim=1),
        torch.stack([sin * flip, cos, shift_y], dim=1),
    ], dim=1)
    work = images.float()
    grid = F.affine_grid(theta, list(work.shape), align_corners=False)
    moved = F.grid_sample(work, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # 2. Brightness and contrast around mid-grey.
    adjusted = (moved - 0.5) * contrast + 0.5 + brightness
    return adjusted.clamp_(0.0, 1.0).to(images.dtype)


def _uniform(
    n: int, half_width: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """``n`` uniform draws in ``[-half_width, half_width]``, made on the CPU, put on ``device``."""
    draw = torch.rand(n, generator=generator)
    return ((2 * draw - 1) * half_width).to(device)


def augment_labels(
    images: torch.Tensor, labels: torch.Tensor, chosen: Sequence[int]
) -> torch.Tensor:
    """Augment the images of the ``chosen`` classes in a batch; the others stay unchanged."""
    if not chosen:
        return images
    selected = torch.isin(labels, torch.tensor(list(chosen), device=labels.device))
    if bool(selected.all()):
        return augment_batch(images)
    if not bool(selected.any()):
        return images
    result = images.clone()
    result[selected] = augment_batch(images[selected])
    return result


# ---------------------------------------------------------------- data module


class RadiographDataModule(L.LightningDataModule):
    """The prepared dataset by split, loaded into memory once.

    Args:
        records_path: ``data/prepared/records.parquet``.
        pixel_dir: ``data/prepared/pixels``.
        split_path: ``data/split/split.parquet``.
        batch_size: images per batch.
        num_workers: loader worker processes (0: load in the training process, right for an
            in-memory dataset).
        balance: ``weighted_loss`` or ``sampler`` (see the module docstring).
        seed: seed of the shuffling and of the balanced sampler.
    """

    def __init__(
        self,
        records_path: Path,
        pixel_dir: Path,
        split_path: Path,
        batch_size: int = 32,
        num_workers: int = 0,
        balance: str = "weighted_loss",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if balance not in BALANCE_MODES:
            raise ValueError(f"balance must be one of {', '.join(BALANCE_MODES)}, got {balance}")
        self.records_path, self.pixel_dir, self.split_path = records_path, pixel_dir, split_path
        self.batch_size, self.num_workers = batch_size, num_workers
        self.balance, self.seed = balance, seed
        self.splits: dict[str, SplitTensors] = {}

    def setup(self, stage: str | None = None) -> None:
        """Read the tables and every shard once; later calls reuse the tensors.

        Raises:
            TrainingDataError: when the dataset is unusable (see ``read_labelled_records``,
                ``load_pixels``), or the train or val split lacks a class.
        """
        if self.splits:
            return
        records = read_labelled_records(self.records_path, self.split_path)
        self.splits = split_tensors(records, load_pixels(self.pixel_dir, records))
        for name in ("train", "val"):
            present = set(self.splits[name].labels.tolist())
            if present != set(LABELS.values()):
                raise TrainingDataError(
                    f"{self.split_path}: the {name} split needs both normal and osteoporosis "
                    f"images, it has {len(self.splits[name])} images of labels {sorted(present)}"
                )
        logger.info("dataset in memory: %s images (%s)", len(records), ", ".join(
            f"{name} {len(self.splits[name])}" for name in SPLITS))

    # ------------------------------------------------------------ figures of the train split

    @property
    def image_size(self) -> int:
        return int(self.splits["train"].images.shape[-1])

    def clinical_stats(self) -> ClinicalStats:
        """Age and BMI standardisation statistics of the train split."""
        clinical = self.splits["train"].clinical.numpy()
        return ClinicalStats.from_frame(pd.DataFrame({"age": clinical[:, 0],
                                                      "bmi": clinical[:, 2]}))

    def class_counts(self) -> list[int]:
        """Train images per class: ``[normal, osteoporosis]``."""
        return torch.bincount(self.splits["train"].labels, minlength=2).tolist()

    def class_weights(self) -> list[float] | None:
        """Cross-entropy class weights ``n / (2 * n_class)``, or None with the sampler."""
        if self.balance != "weighted_loss":
            return None
        counts = self.class_counts()
        return [sum(counts) / (2 * count) for count in counts]

    def augmented_labels(self, mode: str) -> list[int]:
        """Classes whose training images are augmented under ``train.augment`` = ``mode``.

        Raises:
            ValueError: for a mode outside ``AUGMENT_MODES``.
        """
        if mode not in AUGMENT_MODES:
            raise ValueError(f"augment must be one of {', '.join(AUGMENT_MODES)}, got {mode}")
        normal, osteoporosis = self.class_counts()
        if mode == "all":
            return [0, 1]
        if mode == "none" or normal == osteoporosis:
            return []
        return [1] if osteoporosis < normal else [0]

    # ------------------------------------------------------------ loaders

    def _loader(self, name: str, **options: object) -> DataLoader:
        return DataLoader(
            RadiographDataset(self.splits[name]), batch_size=self.batch_size,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            **options,  # type: ignore[arg-type]
        )

    def train_dataloader(self) -> DataLoader:
        train = self.splits["train"]
        generator = torch.Generator().manual_seed(self.seed)
        drop_last = len(train) > self.batch_size  # a batch of one breaks batch normalisation
        if self.balance == "sampler":
            counts = torch.bincount(train.labels, minlength=2).double()
            sampler = WeightedRandomSampler((1.0 / counts)[train.labels].tolist(),
                                            num_samples=len(train),
                                            replacement=True, generator=generator)
            return self._loader("train", sampler=sampler, drop_last=drop_last)
        return self._loader("train", shuffle=True, generator=generator, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
