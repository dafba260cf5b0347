"""The network of figure 7: image features and the patient's data before the affine layer.

Sections 2.5 and 2.7 of the report describe a pre-trained CNN whose personal data of the
patient (age, sex, BMI) are added just before the affine (fully connected) layer, topped by a
SoftMax over the two categories "osteoporosis" and "normal". ``OsteoNet`` is that network:

1. the grey radiograph becomes the backbone's ImageNet input (``ImageNetInput``);
2. the MobileNetV2 feature blocks and a global average pool give a 1280-d image vector;
3. the clinical vector is appended: age and BMI standardised with the train split's mean and
   standard deviation (``ClinicalStats``, stored with the model), sex encoded as one column,
   ``F`` = 1, ``M`` = 0 (left unstandardised: the two values are already on the unit scale);
4. dropout, then the affine layer to two logits; ``probabilities`` applies the SoftMax and
   column 1 is P(osteoporosis).

Which backbone blocks learn is set by ``set_trainable_from``: blocks before the index keep their
ImageNet weights and their batch-normalisation statistics (held in eval mode even while the
network trains), the others are fine-tuned with the head.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from models.backbone import FEATURE_BLOCKS, FEATURE_CHANNELS, ImageNetInput, MobileNetV2

CLINICAL_FEATURES = ("age", "sex_f", "bmi")
SEX_CODES = {"F": 1.0, "M": 0.0}
MIN_STD = 1e-6


@dataclass(frozen=True)
class ClinicalStats:
    """Mean and standard deviation of age and BMI on the train split.

    Stored in the checkpoint's hyperparameters so that inference standardises exactly as
    training did. They are aggregates of the train split and identify no patient.
    """

    age_mean: float
    age_std: float
    bmi_mean: float
    bmi_std: float

    @classmethod
    def from_frame(cls, records: pd.DataFrame) -> ClinicalStats:
        """Statistics of the ``age`` and ``bmi`` columns (a constant column gets std 1)."""
        age, bmi = records["age"].astype(float), records["bmi"].astype(float)
        return cls(
            age_mean=float(age.mean()), age_std=_usable_std(age.std(ddof=0)),
            bmi_mean=float(bmi.mean()), bmi_std=_usable_std(bmi.std(ddof=0)),
        )

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _usable_std(std: float) -> float:
    return float(std) if np.isfinite(std) and std > MIN_STD else 1.0


def encode_sex(sexes: Iterable[str]) -> np.ndarray:
    """Sex codes as floats: ``F`` -> 1.0, ``M`` -> 0.0.

    Raises:
        ValueError: for any other value (the validate stage admits only ``F`` and ``M``).
    """
    values = list(sexes)
    unknown = sorted({str(value) for value in values} - SEX_CODES.keys())
    if unknown:
        raise ValueError(f"sex must be F or M, got {', '.join(unknown)}")
    return np.array([SEX_CODES[value] for value in values], dtype=np.float32)


def clinical_matrix(
    age: Sequence[float] | np.ndarray, sex: Sequence[str], bmi: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Raw clinical vectors ``(N, 3)``: age in years, sex code, BMI in kg/m2.

    Raises:
        ValueError: when the lengths differ or a sex is not ``F``/``M``.
    """
    if not len(age) == len(sex) == len(bmi):
        raise ValueError(f"age, sex and bmi lengths differ: {len(age)}, {len(sex)}, {len(bmi)}")
    columns = [np.asarray(age, dtype=np.float32), encode_sex(sex), np.asarray(bmi, np.float32)]
    return np.stack(columns, axis=1)


class OsteoNet(nn.Module):
    """MobileNetV2 features fused with age, sex and BMI before the affine layer.

    Args:
        stats: standardisation statistics of the train split.
        dropout: dropout probability on the fused vector.
        backbone: a MobileNetV2 whose ``features`` are used (its ImageNet classifier is
            discarded); a randomly initialised one when None (e.g. before loading a checkpoint).
        image_size: side of the images the network is trained on, checked by ``predict``;
            None accepts any size.
    """

    clinical_mean: torch.Tensor
    clinical_std: torch.Tensor

    def __init__(
        self,
        stats: ClinicalStats,
        dropout: float = 0.2,
        backbone: MobileNetV2 | None = None,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        self.stats, self.image_size = stats, image_size
        self.input = ImageNetInput()
        self.features = (backbone or MobileNetV2()).features
        self.register_buffer("clinical_mean", torch.tensor(
            [stats.age_mean, 0.0, stats.bmi_mean]), persistent=False)
        self.register_buffer("clinical_std", torch.tensor(
            [stats.age_std, 1.0, stats.bmi_std]), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(FEATURE_CHANNELS + len(CLINICAL_FEATURES), 2)
        self.trainable_from: int | None = 0

    def forward(self, images: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        """Two logits (normal, osteoporosis) per image.

        Args:
            images: ``(N, H, W)`` or ``(N, 1, H, W)`` grey images in ``[0, 1]``.
            clinical: ``(N, 3)`` raw age, sex code (F=1, M=0) and BMI.
        """
        pooled = self.features(self.input(images)).mean(dim=(2, 3))
        standardised = (clinical.to(pooled.dtype) - self.clinical_mean) / self.clinical_std
        fused = torch.cat([pooled, standardised], dim=1)
        logits: torch.Tensor = self.head(self.dropout(fused))
        return logits

    def probabilities(self, images: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        """SoftMax of the logits; column 1 is P(osteoporosis)."""
        return torch.softmax(self.forward(images, clinical), dim=1)

    # ------------------------------------------------------------ fine-tuning

    def set_trainable_from(self, block: int | None) -> None:
        """Fine-tune backbone blocks ``block`` onwards; freeze the others (None: all frozen).

        The head always learns. Frozen blocks get ``requires_grad=False`` and their batch
        normalisation stays in eval mode, so neither weights nor running statistics move.

        Raises:
            ValueError: when ``block`` is outside ``0 .. FEATURE_BLOCKS``.
        """
        if block is not None and not 0 <= block <= FEATURE_BLOCKS:
            raise ValueError(f"backbone block index must be 0..{FEATURE_BLOCKS}, got {block}")
        self.trainable_from = block
        first_trainable = FEATURE_BLOCKS if block is None else block
        for index, module in enumerate(self.features):
            module.requires_grad_(index >= first_trainable)
        self.train(self.training)

    def frozen_blocks(self) -> range:
        """Indices of the backbone blocks that do not learn."""
        first_trainable = FEATURE_BLOCKS if self.trainable_from is None else self.trainable_from
        return range(first_trainable)

    def train(self, mode: bool = True) -> OsteoNet:
        """Set train/eval mode, keeping frozen blocks in eval mode."""
        super().train(mode)
        for index in self.frozen_blocks():
            self.features[index].eval()
        return self
