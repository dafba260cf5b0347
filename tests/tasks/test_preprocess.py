"""Tests of the preprocess stage: DICOM intensity handling, resize, sharding and quarantine."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from osteo.config import ConfigError
from osteo.layout import Layout
from osteo.shards import ShardWriter, read_shard, shard_members, shard_paths
from tasks.preprocess import (
    PREPARED_COLUMNS,
    ImageRejected,
    PreprocessError,
    preprocess,
    resize_bilinear,
    to_model_input,
)
from tests.radiographs import read_test_radiograph

PARAMS = {"preprocess": {"size": 24, "shard_size": 4}}

FLOAT16_STEP = 1e-3


def _record(**fields: Any) -> dict[str, Any]:
    """Display attributes of a MONOCHROME2 image without rescale or window, overridden."""
    return {
        "photometric": "MONOCHROME2", "rescale_slope": 1.0, "rescale_intercept": 0.0,
        "window_center": None, "window_width": None, **fields,
    }


def _ramp(side: int = 16) -> np.ndarray:
    return np.arange(side * side, dtype=np.uint16).reshape(side, side)


def _dicom(name: str) -> tuple[np.ndarray, dict[str, Any]]:
    dataset = read_test_radiograph(name)
    record = _record(
        photometric=dataset.PhotometricInterpretation,
        window_center=float(dataset.WindowCenter), window_width=float(dataset.WindowWidth),
    )
    return dataset.pixel_array, record


# ---------------------------------------------------------------- intensities


def test_explicit_window_follows_dicom_linear_formula() -> None:
    pixels = _ramp()
    image = to_model_input(pixels, _record(window_center=100.0, window_width=51.0), size=16)

    # PS3.3 C.11.2.1.2 with c = 100, w = 51: 0 at or below 74.5, 1 above 124.5.
    expected = np.clip((pixels.astype(np.float64) - 74.5) / 50.0, 0, 1)
    np.testing.assert_allclose(image.astype(np.float64), expected, atol=FLOAT16_STEP)
    assert image.flat[74] == 0 and image.flat[125] == 1


def test_missing_window_falls_back_to_percentile_range() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(1000, 2001, size=(64, 64)).astype(np.uint16)
    pixels[0, :10] = 0          # a few extreme values (under 0.5 %) must not set the window
    pixels[1, :10] = 60000

    image = to_model_input(pixels, _record(), size=64).astype(np.float64)

    low, high = np.percentile(pixels, [0.5, 99.5], method="lower")
    expected = np.clip((pixels.astype(np.float64) - low) / (high - low), 0, 1)
    np.testing.assert_allclose(image, expected, atol=FLOAT16_STEP)
    assert image[pixels == 1500].mean() == pytest.approx(0.5, abs=0.02)


def test_monochrome1_is_inverted_so_bone_is_bright() -> None:
    # In MONOCHROME1 low stored values display white: bone, which blocks X-rays, is stored low.
    pixels = np.full((32, 32), 900, dtype=np.uint16)
    pixels[8:24, 12:20] = 100
    bone = np.zeros((32, 32), dtype=bool)
    bone[8:24, 12:20] = True

    as_stored = to_model_input(pixels, _record(photometric="MONOCHROME1"), size=32)
    not_inverted = to_model_input(pixels, _record(photometric="MONOCHROME2"), size=32)

    assert as_stored[bone].mean() > 0.9 and as_stored[~bone].mean() < 0.1
    assert not_inverted[bone].mean() < 0.1


def test_rescale_slope_and_intercept_map_to_modality_values_before_the_window() -> None:
    pixels = _ramp()
    record = _record(rescale_slope=2.0, rescale_intercept=-100.0,
                     window_center=200.5, window_width=201.0)

    image = to_model_input(pixels, record, size=16).astype(np.float64)

    # Window in modality units: 0 at or below 100, 1 above 300, i.e. stored 100 to 200.
    modality = pixels * 2.0 - 100.0
    np.testing.assert_allclose(image, np.clip((modality - 100) / 200, 0, 1), atol=FLOAT16_STEP)
    assert image.flat[150] == pytest.approx(0.5, abs=FLOAT16_STEP)


def test_window_narrower_than_one_is_rejected() -> None:
    with pytest.raises(ImageRejected) as rejected:
        to_model_input(_ramp(), _record(window_center=50.0, window_width=0.0), size=16)
    assert rejected.value.reason == "invalid_window"


def test_constant_image_without_window_is_rejected() -> None:
    with pytest.raises(ImageRejected) as rejected:
        to_model_input(np.full((16, 16), 7, dtype=np.uint16), _record(), size=16)
    assert rejected.value.reason == "constant_image"


# ---------------------------------------------------------------- geometry


def test_output_is_float16_square_in_unit_range_with_aspect_kept() -> None:
    pixels = np.random.default_rng(1).integers(0, 4096, size=(300, 200)).astype(np.uint16)

    image = to_model_input(pixels, _record(), size=48)

    assert image.shape == (48, 48) and image.dtype == np.float16
    assert image.min() >= 0 and image.max() <= 1
    # 300 x 200 becomes 48 x 32, centred: 8 black columns on each side.
    assert not image[:, :8].any() and not image[:, 40:].any()
    assert image[:, 8:40].min() >= 0 and image[:, 8:40].mean() > 0.3


def test_downscaling_averages_a_fine_checkerboard_instead_of_aliasing() -> None:
    checkerboard = (np.indices((1000, 1000)).sum(axis=0) % 2).astype(np.float32)

    image = resize_bilinear(checkerboard, 224)

    assert image.shape == (224, 224)
    assert image.mean() == pytest.approx(0.5, abs=0.01)
    assert image.max() - image.min() < 0.02


@pytest.mark.parametrize("name", ["RG3_UNCR.dcm", "RG1_UNCR.dcm"])
def test_real_computed_radiograph_becomes_a_model_input(name: str) -> None:
    pixels, record = _dicom(name)

    image = to_model_input(pixels, record, size=224)
    as_monochrome2 = to_model_input(pixels, {**record, "photometric": "MONOCHROME2"}, size=224)

    assert image.shape == (224, 224) and image.dtype == np.float16
    assert 0 <= image.min() and image.max() <= 1 and image.astype(np.float32).std() > 0.1
    content = image.any(axis=0)  # RG1 is not square: its padded columns stay black
    np.testing.assert_allclose(image[:, content].astype(np.float32)
                               + as_monochrome2[:, content].astype(np.float32), 1.0, atol=2e-3)


def test_tibia_radiograph_shows_bone_brighter_than_air() -> None:
    pixels, record = _dicom("RG3_UNCR.dcm")  # MONOCHROME1, lower leg

    image = to_model_input(pixels, record, size=224).astype(np.float32)

    # Columns 64-84 are direct exposure beside the leg, 100-130 the tibia and fibula.
    assert image[40:120, 100:130].mean() > image[40:120, 64:84].mean() + 0.4


# ---------------------------------------------------------------- the stage


def _validated_project(root: Path) -> Layout:
    """Validated records and pseudonymised shards: five good model inputs and three bad ones.

    shard-00000 holds three good inputs and one of the wrong size, shard-00001 two good ones;
    one record names a member its shard lacks, one a shard that does not exist.
    """
    layout = Layout(root)
    rng = np.random.default_rng(3)

    def stored_values(rows: int, columns: int) -> np.ndarray:
        return rng.integers(0, 4096, (rows, columns)).astype(np.uint16)

    inputs = {
        "Igood1": to_model_input(stored_values(40, 30), _record(), size=24),
        "Igood2": to_model_input(
            rng.integers(0, 1024, (30, 40)).astype(np.uint16),
            _record(photometric="MONOCHROME1", window_center=512.0, window_width=600.0), size=24),
        "Igood3": to_model_input(stored_values(32, 32), _record(), size=24),
        "Isize": to_model_input(stored_values(32, 32), _record(), size=16),
        "Igood4": to_model_input(stored_values(24, 30), _record(), size=24),
        "Igood5": to_model_input(stored_values(30, 24), _record(), size=24),
    }
    rows = []
    with ShardWriter(layout.pseudonymised_pixel_dir, shard_size=4) as writer:
        for number, (image_id, image) in enumerate(inputs.items()):
            rows.append({"image_id": image_id, "patient_id": f"P{number:016x}",
                         "age": 60 + number, "sex": "F", "bmi": 24.5, "label": "normal",
                         "n_readers": 2, "reader_agreement": 1.0,
                         "shard": writer.add(f"{number:06d}", image), "member": f"{number:06d}",
                         "content_key": hashlib.sha256(image.tobytes()).hexdigest()})
    rows.append({**rows[0], "image_id": "Iabsent", "member": "000099"})
    rows.append({**rows[0], "image_id": "Imissing", "shard": "shard-00009.npz"})
    layout.validated_dir.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(layout.validated_records, index=False)
    return layout


def test_stage_publishes_the_accepted_model_inputs_without_copying_whole_shards(
    tmp_path: Path,
) -> None:
    layout = _validated_project(tmp_path)
    stale = layout.prepared_pixel_dir / "shard-00007.npz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from an earlier run")

    summary = preprocess.fn(layout, PARAMS)

    records = pd.read_parquet(layout.prepared_records)
    assert list(records.columns) == PREPARED_COLUMNS
    assert list(records["image_id"]) == ["Igood1", "Igood2", "Igood3", "Igood4", "Igood5"]
    prepared = {path.name: path for path in shard_paths(layout.prepared_pixel_dir)}
    assert sorted(prepared) == ["shard-00000.npz", "shard-00001.npz"]
    source = layout.pseudonymised_pixel_dir
    assert prepared["shard-00001.npz"].samefile(source / "shard-00001.npz")  # all kept: linked
    assert not prepared["shard-00000.npz"].samefile(source / "shard-00000.npz")
    assert shard_members(prepared["shard-00000.npz"]) == ["000000", "000001", "000002"]
    for row in records.itertuples():
        with read_shard(prepared[row.shard]) as kept, read_shard(source / row.shard) as whole:
            np.testing.assert_array_equal(kept[row.member], whole[row.member])
            assert row.content_key == hashlib.sha256(kept[row.member].tobytes()).hexdigest()
    written = json.loads(layout.summary("preprocess").read_text())
    assert written["records_in"] == 8 and written["accepted"] == 5
    assert written["extra"]["size"] == 24 and written["extra"]["shards"] == 2
    assert summary.quarantined_total == 3


def test_missing_or_wrongly_sized_model_inputs_are_quarantined(tmp_path: Path) -> None:
    layout = _validated_project(tmp_path)

    summary = preprocess.fn(layout, PARAMS)

    quarantine = pd.read_csv(layout.quarantine("preprocess"))
    reasons = dict(zip(quarantine["record_id"], quarantine["reason"], strict=True))
    assert reasons == {"Isize": "size_mismatch", "Iabsent": "missing_pixels",
                       "Imissing": "missing_pixels"}
    size_detail = quarantine.set_index("record_id").at["Isize", "detail"]
    assert "16x16" in size_detail and "run the ingest stage again" in size_detail
    assert set(quarantine["stage"]) == {"preprocess"}
    assert summary.quarantined == {"size_mismatch": 1, "missing_pixels": 2}


def test_a_record_without_content_key_is_quarantined_and_its_image_left_out(
    tmp_path: Path,
) -> None:
    layout = _validated_project(tmp_path)
    records = pd.read_parquet(layout.validated_records)
    records.loc[records["image_id"] == "Igood5", "content_key"] = None
    records.to_parquet(layout.validated_records, index=False)

    preprocess.fn(layout, PARAMS)

    quarantine = pd.read_csv(layout.quarantine("preprocess")).set_index("record_id")
    assert quarantine.at["Igood5", "reason"] == "missing_pixels"
    assert "content key" in quarantine.at["Igood5", "detail"]
    assert shard_members(layout.prepared_pixel_dir / "shard-00001.npz") == ["000004"]


def test_missing_validated_records_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PreprocessError, match="validate stage"):
        preprocess.fn(Layout(tmp_path), PARAMS)


def test_non_positive_size_is_a_config_error(tmp_path: Path) -> None:
    layout = _validated_project(tmp_path)
    with pytest.raises(ConfigError, match="preprocess.size"):
        preprocess.fn(layout, {"preprocess": {"size": 0, "shard_size": 2}})
