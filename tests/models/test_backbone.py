"""The pre-trained backbone: ImageNet weights loaded strictly, and only from the pinned file."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import torch
from PIL import Image

from models.backbone import (
    FEATURE_BLOCKS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMAGENET_WEIGHTS_SHA256,
    ImageNetInput,
    MobileNetV2,
    WeightsIntegrityError,
    file_sha256,
    imagenet_mobilenet_v2,
    load_verified_state_dict,
    packaged_weights_path,
)

MILITARY_UNIFORM = 652  # ImageNet class of the portrait of Grace Hopper in uniform


class Payload:
    """An arbitrary object: unpickling it would run code from the file."""


def grey_portrait(size: int = 224) -> torch.Tensor:
    """The photograph shipped with matplotlib, grey, ``(1, 1, size, size)`` in [0, 1]."""
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    image = Image.open(path).convert("L").resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).view(1, 1, size, size)


def test_imagenet_weights_load_strictly_and_recognise_a_photograph() -> None:
    network = imagenet_mobilenet_v2()
    state = load_verified_state_dict()

    assert network.load_state_dict(state, strict=True).missing_keys == []
    assert set(network.state_dict()) == set(state)
    assert len(network.features) == FEATURE_BLOCKS
    with torch.inference_mode():
        inputs = ImageNetInput()(grey_portrait())
        logits = network(inputs)
        features = network.pooled_features(inputs)
    assert logits.shape == (1, 1000) and features.shape == (1, 1280)
    assert int(logits.argmax()) == MILITARY_UNIFORM


def test_packaged_weights_file_has_the_pinned_checksum() -> None:
    assert file_sha256(packaged_weights_path()) == IMAGENET_WEIGHTS_SHA256


def test_weights_file_with_one_byte_changed_is_refused(tmp_path: Path) -> None:
    tampered = tmp_path / "mobilenet_v2.pth"
    shutil.copyfile(packaged_weights_path(), tampered)
    content = bytearray(tampered.read_bytes())
    content[len(content) // 2] ^= 0x01
    tampered.write_bytes(bytes(content))

    with pytest.raises(WeightsIntegrityError, match="refusing to load") as error:
        imagenet_mobilenet_v2(tampered)
    assert str(tampered) in str(error.value)


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(WeightsIntegrityError, match="not found"):
        load_verified_state_dict(tmp_path / "absent.pth")


def test_own_weights_file_loads_with_its_own_checksum_only(tmp_path: Path) -> None:
    own = tmp_path / "practice_weights.pth"
    torch.save(MobileNetV2().state_dict(), own)

    network = imagenet_mobilenet_v2(own, file_sha256(own).upper())

    assert isinstance(network, MobileNetV2)
    with pytest.raises(WeightsIntegrityError):
        imagenet_mobilenet_v2(own)  # the ImageNet checksum does not fit this file


def test_file_holding_code_is_refused_even_with_a_matching_checksum(tmp_path: Path) -> None:
    pickled = tmp_path / "pickled.pth"
    torch.save({"features.0.0.weight": torch.zeros(1), "hook": Payload()}, pickled)

    with pytest.raises(WeightsIntegrityError, match="not a plain state dict"):
        load_verified_state_dict(pickled, file_sha256(pickled))


def test_grey_images_become_normalised_three_channel_input() -> None:
    grey = torch.full((2, 8, 8), 0.5, dtype=torch.float16)

    inputs = ImageNetInput()(grey)

    assert inputs.shape == (2, 3, 8, 8) and inputs.dtype == torch.float32
    expected = [(0.5 - mean) / std for mean, std in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert torch.allclose(inputs[0, :, 0, 0], torch.tensor(expected))
