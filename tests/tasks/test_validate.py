"""The validate stage: suites kept as data, quarantine per reason, robust outlier rejection."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from osteo.config import load_params
from osteo.layout import Layout
from osteo.radiograph import PixelEncoding, image_statistics
from osteo.seaweed import EmbeddedS3
from osteo.shards import ShardWriter
from osteo.summary import StageSummary
from tasks.ingest import ingest
from tasks.preprocess import preprocess
from tasks.pseudonymise import pseudonymise
from tasks.validate import (
    SUITES_DIR,
    ValidateError,
    find_outliers,
    load_suite,
    robust_z_scores,
    validate,
)
from tests.exports import (
    Annotation,
    default_images,
    default_patients,
    make_png,
    sample_pixels,
    write_export,
)
from tests.radiographs import read_test_radiograph

GOOD = 20
Image = Callable[[np.random.Generator], np.ndarray]


def radiograph(rng: np.random.Generator, level: float | None = None,
               shape: tuple[int, int] = (64, 80)) -> np.ndarray:
    """A small 12-bit image: a level, a gentle gradient and noise, never clipped."""
    level = rng.uniform(0.40, 0.50) if level is None else level
    gradient = np.linspace(-0.05, 0.05, shape[1])[None, :]
    values = (level + gradient + rng.normal(0, 0.02, shape)) * 4095
    return np.clip(values, 0, 4095).astype(np.uint16)


def blank(rng: np.random.Generator) -> np.ndarray:
    return np.full((64, 80), 2000, dtype=np.uint16)


def saturated(rng: np.random.Generator) -> np.ndarray:
    pixels = radiograph(rng)
    pixels[10:50, 8:72] = 4095       # half of the image at the brightest value, inside the field
    return pixels


def shuttered(rng: np.random.Generator) -> np.ndarray:
    """A radiograph whose side bands (45 % of it) a shutter blanked to the darkest value."""
    pixels = radiograph(rng)
    pixels[:, :18] = pixels[:, 62:] = 0
    return pixels


def small(rng: np.random.Generator) -> np.ndarray:
    return radiograph(rng, shape=(32, 40))


def bright(rng: np.random.Generator) -> np.ndarray:
    return radiograph(rng, level=0.85)


def record(number: int, rng: np.random.Generator, **changes: Any) -> dict[str, Any]:
    """A valid pseudonymised record; ``changes`` override fields."""
    fields: dict[str, Any] = {
        "image_id": f"I{number:016x}", "patient_id": f"P{number:016x}",
        "age": int(rng.integers(45, 85)), "sex": "FM"[number % 2],
        "bmi": float(rng.uniform(20, 30)), "label": ("normal", "osteoporosis")[number % 2],
        "n_readers": 2, "reader_agreement": 1.0, "modality": "CR", "photometric": "MONOCHROME2",
        "bits_stored": 12, "rescale_slope": 1.0, "rescale_intercept": 0.0,
        "window_center": None, "window_width": None, "rows": 64, "columns": 80,
        "content_key": None, "input_reason": None, "input_detail": None, "shard": "",
    }
    return fields | changes


def build_project(
    root: Path, defects: dict[str, tuple[dict[str, Any], Image | None]], good: int = GOOD,
) -> Layout:
    """Write records.parquet and pixel shards: ``good`` valid records plus named defects.

    Each defect is ``(record changes, image maker)``; a None image maker writes no pixels (the
    record keeps the statistics of an ordinary radiograph, as if its pixels were lost after
    ingest measured them). Statistics are measured as ingest measures them.
    """
    rng = np.random.default_rng(5)
    layout = Layout(root)
    rows = []
    with ShardWriter(layout.pseudonymised_pixel_dir, shard_size=8) as writer:
        makers: list[tuple[dict[str, Any], Image | None]] = [({}, radiograph)] * good
        makers += list(defects.values())
        for number, (changes, maker) in enumerate(makers):
            fields = record(number, rng, **changes)
            pixels = (maker or radiograph)(rng)
            if fields["photometric"] == "MONOCHROME1":
                pixels = 4095 - pixels
            fields |= image_statistics(pixels, PixelEncoding.of(fields))
            fields["member"] = fields["image_id"]
            if not fields["input_reason"]:
                fields["content_key"] = hashlib.sha256(pixels.tobytes()).hexdigest()
            if fields["input_reason"]:  # ingest made no model input: no pixels, no shard
                fields["shard"] = fields["member"] = None
            elif maker is not None:
                fields["shard"] = writer.add(fields["member"], pixels)
            else:
                fields["shard"] = "shard-00000.npz"
            rows.append(fields)
    layout.pseudonymised_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(layout.pseudonymised_records, index=False)
    return layout


def image_id(number: int) -> str:
    return f"I{number:016x}"


DEFECTS: dict[str, tuple[dict[str, Any], Image | None]] = {
    "age_out_of_range": ({"age": 5}, radiograph),
    "bmi_out_of_range": ({"bmi": 95.0}, radiograph),
    "sex_unknown": ({"sex": "X"}, radiograph),
    "image_blank": ({}, blank),
    "image_saturated": ({}, saturated),
    "image_too_small": ({"rows": 32, "columns": 40}, small),
    "image_bits_exceed_stored": ({"bits_stored": 10}, radiograph),
    "image_missing": ({}, None),
    "uniform_after_window": ({"input_reason": "uniform_after_window",
                              "input_detail": "every pixel is about 1.00 after windowing"}, None),
    "outlier_image": ({}, bright),
    "outlier_bmi": ({"bmi": 60.0}, radiograph),
    "several_failures": ({"age": 130}, blank),
    "monochrome1": ({"photometric": "MONOCHROME1"}, radiograph),
}
DEFECT_IDS = {name: image_id(GOOD + n) for n, name in enumerate(DEFECTS)}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, StageSummary]:
    """One run over good records and one record per defect."""
    root = tmp_path_factory.mktemp("validate")
    shutil.copy(Path(__file__).resolve().parents[2] / "params.yaml", root / "params.yaml")
    layout = build_project(root, DEFECTS)
    return layout, validate.fn(layout, load_params(root))


def quarantine_of(layout: Layout) -> pd.DataFrame:
    return pd.read_csv(layout.quarantine("validate"), keep_default_na=False)


def reason_of(layout: Layout, record_id: str) -> str:
    rows = quarantine_of(layout).set_index("record_id")
    return str(rows.at[record_id, "reason"])


# ---------------------------------------------------------------- one test per reason


@pytest.mark.parametrize("reason", [
    "age_out_of_range", "bmi_out_of_range", "sex_unknown", "image_blank", "image_saturated",
    "image_too_small", "image_bits_exceed_stored", "image_missing", "uniform_after_window",
])
def test_each_defect_is_quarantined_with_its_reason(
    mixed: tuple[Layout, StageSummary], reason: str,
) -> None:
    layout, summary = mixed
    assert reason_of(layout, DEFECT_IDS[reason]) == reason
    also_first_failure_of_several = 1 if reason == "age_out_of_range" else 0
    assert summary.quarantined[reason] == 1 + also_first_failure_of_several


def test_unknown_sex_detail_names_the_expectation_but_not_the_value(
    mixed: tuple[Layout, StageSummary],
) -> None:
    layout, _ = mixed
    row = quarantine_of(layout).set_index("record_id").loc[DEFECT_IDS["sex_unknown"]]
    assert "expect_column_values_to_be_in_set" in row["detail"]
    assert "sex=(text withheld)" in row["detail"]
    assert row["source"] == "data/pseudonymised/records.parquet"


def test_image_defect_source_names_the_shard(mixed: tuple[Layout, StageSummary]) -> None:
    layout, _ = mixed
    row = quarantine_of(layout).set_index("record_id").loc[DEFECT_IDS["image_saturated"]]
    assert row["source"].startswith("data/pseudonymised/pixels/shard-")
    assert "frac_bright=" in row["detail"]


@pytest.mark.parametrize(("defect", "feature"), [
    ("outlier_image", "mean_norm"), ("outlier_bmi", "bmi"),
])
def test_outlier_is_quarantined_with_feature_and_z(
    mixed: tuple[Layout, StageSummary], defect: str, feature: str,
) -> None:
    layout, summary = mixed
    row = quarantine_of(layout).set_index("record_id").loc[DEFECT_IDS[defect]]
    assert row["reason"] == "outlier"
    assert f"{feature} z=+" in row["detail"]
    z = float(row["detail"].split(f"{feature} z=")[1].split(",")[0])
    assert z > 6.0
    assert summary.extra["outliers"][feature] >= 1


def test_record_failing_several_checks_is_quarantined_once_under_its_first_failure(
    mixed: tuple[Layout, StageSummary],
) -> None:
    layout, _ = mixed
    rows = quarantine_of(layout)
    mine = rows[rows["record_id"] == DEFECT_IDS["several_failures"]]
    assert len(mine) == 1
    assert mine.iloc[0]["reason"] == "age_out_of_range"
    assert "image_blank" in mine.iloc[0]["detail"]


def test_good_records_continue_with_their_statistics(mixed: tuple[Layout, StageSummary]) -> None:
    layout, _ = mixed
    validated = pd.read_parquet(layout.validated_records)
    expected = {image_id(n) for n in range(GOOD)} | {DEFECT_IDS["monochrome1"]}
    assert set(validated["image_id"]) == expected
    assert {"pixel_p01", "pixel_p99", "frac_bright", "mean_norm", "bits_used"} <= set(validated)
    assert (validated["height"] == 64).all() and (validated["bits_used"] <= 12).all()
    mono1 = validated.set_index("image_id").loc[DEFECT_IDS["monochrome1"], "mean_norm"]
    assert 0.35 < mono1 < 0.6           # inverted to the MONOCHROME2 convention


def test_counts_add_up(mixed: tuple[Layout, StageSummary]) -> None:
    layout, summary = mixed
    rows = quarantine_of(layout)
    validated = pd.read_parquet(layout.validated_records)
    records_in = len(pd.read_parquet(layout.pseudonymised_records))
    assert summary.records_in == records_in == GOOD + len(DEFECTS)
    assert summary.accepted == len(validated)
    assert summary.quarantined_total == len(rows) == len(DEFECTS) - 1
    assert summary.accepted + summary.quarantined_total == summary.records_in
    assert not set(rows["record_id"]) & set(validated["image_id"])


def test_summary_json_lists_expectations_and_outliers(mixed: tuple[Layout, StageSummary]) -> None:
    layout, summary = mixed
    document = json.loads(layout.summary("validate").read_text())
    assert document["stage"] == "validate" and document["unit"] == "image"
    assert document["quarantined"] == summary.quarantined
    checks = {(c["suite"], c["reason"], tuple(c["columns"])): c
              for c in document["extra"]["expectations"]}
    age = checks[("records", "age_out_of_range", ("age",))]
    assert age["success"] is False and age["unexpected"] == 2
    assert checks[("records", "label_unknown", ("label",))]["success"] is True
    assert document["extra"]["outliers"]["mean_norm"] == 1
    assert "aspect" in document["extra"]["outlier_features_not_used"]
    assert set(document["extra"]["suites_sha256"]) == {"records.json", "images.json"}
    assert document["extra"]["timings"]["gx_setup_seconds"] >= 0


def test_html_report_names_every_reason(mixed: tuple[Layout, StageSummary]) -> None:
    layout, summary = mixed
    page = layout.validation_report.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    for reason in summary.quarantined:
        assert reason in page
    assert DEFECT_IDS["outlier_image"] in page         # the outlier table
    assert "P0000" not in page                          # no patient ids in the report


# ---------------------------------------------------------------- suites and parameters


def test_editing_the_suite_file_changes_the_outcome(project_dir: Path) -> None:
    layout = build_project(project_dir, {"saturated": ({}, saturated)}, good=3)
    suites = project_dir / "suites"
    shutil.copytree(SUITES_DIR, suites)
    params = load_params(project_dir) | {}
    params["validate"] = params["validate"] | {"suites": "suites"}
    assert validate.fn(layout, params).quarantined == {"image_saturated": 1}

    document = json.loads((suites / "images.json").read_text())
    for expectation in document["expectations"]:
        if expectation["kwargs"].get("column") == "frac_bright":
            expectation["kwargs"]["max_value"] = 0.9
    (suites / "images.json").write_text(json.dumps(document))

    summary = validate.fn(layout, params)
    assert summary.quarantined == {} and summary.accepted == 4


def test_age_range_comes_from_params(project_dir: Path) -> None:
    layout = build_project(project_dir, {"old": ({"age": 95}, radiograph)}, good=3)
    params = load_params(project_dir)
    assert validate.fn(layout, params).quarantined == {}
    params["validate"]["age"] = [18, 90]
    assert validate.fn(layout, params).quarantined == {"age_out_of_range": 1}


def test_missing_parameter_names_the_params_key(project_dir: Path) -> None:
    from osteo.config import ConfigError

    layout = build_project(project_dir, {}, good=2)
    params = load_params(project_dir)
    del params["validate"]["bmi"]
    with pytest.raises(ConfigError, match=r"validate\.bmi"):
        validate.fn(layout, params)


def test_extra_identifying_column_stops_the_stage_with_a_clear_message(project_dir: Path) -> None:
    layout = build_project(project_dir, {}, good=2)
    records = pd.read_parquet(layout.pseudonymised_records)
    records["last_name"] = "Doe"
    records.to_parquet(layout.pseudonymised_records, index=False)
    with pytest.raises(ValidateError, match="columns_mismatch") as raised:
        validate.fn(layout, load_params(project_dir))
    message = str(raised.value)
    assert "records.parquet" in message and "records.json" in message
    assert "unexpected columns ['last_name']" in message and "Doe" not in message


def test_missing_records_table_is_a_clear_error(project_dir: Path) -> None:
    with pytest.raises(ValidateError, match="run the pseudonymise stage first"):
        validate.fn(Layout(project_dir), load_params(project_dir))


def test_suite_entry_without_reason_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "records.json"
    document = json.loads((SUITES_DIR / "records.json").read_text())
    del document["expectations"][3]["meta"]["reason"]
    path.write_text(json.dumps(document))
    with pytest.raises(ValidateError, match="expectation 4 has no meta.reason"):
        load_suite(path)


def test_suite_naming_an_absent_column_is_a_clear_error(project_dir: Path) -> None:
    layout = build_project(project_dir, {}, good=2)
    suites = project_dir / "suites"
    shutil.copytree(SUITES_DIR, suites)
    document = json.loads((suites / "images.json").read_text())
    document["expectations"][0]["kwargs"]["column"] = "shortest_side"
    (suites / "images.json").write_text(json.dumps(document))
    params = load_params(project_dir)
    params["validate"]["suites"] = "suites"
    with pytest.raises(ValidateError, match=r"images\.json\): .*could not be evaluated"):
        validate.fn(layout, params)


def test_great_expectations_runs_quietly(
    project_dir: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    layout = build_project(project_dir, {}, good=12)
    with caplog.at_level(logging.INFO):
        validate.fn(layout, load_params(project_dir))
    _, err = capfd.readouterr()
    assert "Calculating Metrics" not in err               # no progress bars
    gx_records = [r for r in caplog.records if r.name.startswith("great_expectations")]
    assert gx_records == []                                # no temporary docs site, no chatter


def test_feature_without_spread_rejects_nothing(project_dir: Path) -> None:
    wide = ({"columns": 120}, lambda rng: radiograph(rng, shape=(64, 120)))
    layout = build_project(project_dir, {"wide": wide}, good=12)
    summary = validate.fn(layout, load_params(project_dir))
    assert summary.accepted == 13
    assert "aspect" in summary.extra["outlier_features_not_used"]


# ---------------------------------------------------------------- statistics and robust z


def test_image_statistics_apply_rescale_and_invert_monochrome1() -> None:
    pixels = np.arange(100 * 100, dtype=np.uint16).reshape(100, 100) % 1000
    stats = image_statistics(pixels, PixelEncoding(bits_stored=10, slope=2.0, intercept=-5.0))
    assert stats["stored_max"] == 999 and stats["bits_used"] == 10
    assert stats["pixel_min"] == -5.0 and stats["pixel_max"] == 2 * 999 - 5
    assert stats["pixel_p01"] == pytest.approx(2 * 10 - 5, abs=4)
    assert stats["pixel_p99"] == pytest.approx(2 * 989 - 5, abs=4)
    assert stats["mean_norm"] == pytest.approx(499.5 / 1023, rel=1e-3)

    inverted = image_statistics(pixels, PixelEncoding(bits_stored=10, monochrome1=True))
    assert inverted["mean_norm"] == pytest.approx(1 - 499.5 / 1023, rel=1e-3)
    assert inverted["p99_norm"] == pytest.approx(1 - stats["p01_norm"], abs=1e-9)


def test_image_statistics_use_every_pixel_for_the_extremes() -> None:
    pixels = np.full((1000, 1000), 100, dtype=np.uint16)
    pixels[1, 1] = 4000                 # not on the subsample's grid
    stats = image_statistics(pixels, PixelEncoding(bits_stored=12))
    assert stats["stored_max"] == 4000 and stats["bits_used"] == 12
    assert stats["std_norm"] < 0.002   # blank apart from one pixel


def test_saturation_shares_leave_out_shuttered_borders_but_not_clipping_inside() -> None:
    encoding = PixelEncoding(bits_stored=12)
    rng = np.random.default_rng(3)

    border = image_statistics(shuttered(rng), encoding)
    inside = image_statistics(saturated(rng), encoding)

    assert border["stored_min"] == 0 and border["frac_dark"] < 0.01
    assert inside["frac_bright"] > 0.25


def test_declared_padding_is_left_out_of_saturation_and_texture() -> None:
    rng = np.random.default_rng(5)
    pixels = rng.integers(800, 3000, size=(400, 400), dtype=np.uint16)
    rows, columns = np.indices(pixels.shape)
    padding = np.hypot(rows - 199.5, columns - 199.5) > 180  # outside a round field
    pixels[padding] = 4095
    encoding = PixelEncoding(bits_stored=12)

    declared = image_statistics(pixels, encoding, padding)
    undeclared = image_statistics(pixels, encoding)
    field_only = image_statistics(pixels[100:300, 100:300], encoding)

    assert undeclared["frac_bright"] > 0.1 and undeclared["stored_max"] == 4095
    assert declared["frac_bright"] < 0.01 and declared["stored_max"] < 3000
    assert declared["texture"] == pytest.approx(field_only["texture"], rel=0.05)
    assert undeclared["texture"] < 0.9 * declared["texture"]  # flat padding dilutes it


def test_a_real_shuttered_radiograph_is_not_saturated() -> None:
    """pydicom-data's tibia (MONOCHROME1): 41 % of it is a shutter band at 0, displayed white."""
    dataset = read_test_radiograph("RG3_UNCR.dcm")
    stats = image_statistics(dataset.pixel_array, PixelEncoding(bits_stored=10,
                                                                monochrome1=True))
    assert stats["frac_bright"] < 0.25 and stats["frac_dark"] < 0.5


def test_robust_z_scores_use_median_and_mad() -> None:
    z, median, mad = robust_z_scores(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert median == 3.0 and mad == 1.0
    assert z[-1] == pytest.approx(97 / 1.4826)
    flat, _, mad = robust_z_scores(np.array([5.0] * 9 + [50.0]))
    assert mad == 0 and np.isnan(flat).all()


def test_too_few_records_reject_no_outlier() -> None:
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0, 1000.0]})
    outliers, spreads = find_outliers(frame, ["x"], 6.0)
    assert outliers == {} and not spreads[0].used


@pytest.mark.s3
def test_pngs_and_dicoms_without_rescale_pass_validation(
    s3_env: EmbeddedS3, project_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No rescale means the identity (a PNG has none, many CR headers leave it out, as
    pydicom-data's radiographs do), and a PNG's sBIT chunk says how many bits its values use."""
    monkeypatch.setenv("OSTEO_VAULT_KEY_FILE", str(tmp_path / "keys" / "vault.key"))
    images = [replace(spec, photometric="MONOCHROME2",
                      pixels=sample_pixels((128, 104), seed=spec.seed))
              for spec in default_images()]
    export = write_export(project_dir / "export", images=images)
    path = export.images_dir / "IMG0005.dcm"
    dataset = pydicom.dcmread(path)
    del dataset.RescaleSlope, dataset.RescaleIntercept
    dataset.save_as(path)
    make_png(export.images_dir / "IMG0004.png", images[3].pixels, significant_bits=10)
    params = load_params(project_dir)
    params["export"]["path"] = "export"
    layout = Layout(project_dir)
    ingest.fn(layout, params)
    pseudonymise.fn(layout, params)

    summary = validate.fn(layout, params)

    quarantine = pd.read_csv(layout.quarantine("validate"))
    assert summary.quarantined == {}, list(zip(quarantine["reason"], quarantine["detail"],
                                               strict=True))
    records = pd.read_parquet(layout.validated_records)
    assert len(records) == 5 and set(records["bits_stored"]) == {10}
    assert (records["rescale_slope"] == 1.0).all() and (records["rescale_intercept"] == 0).all()


@pytest.mark.s3
def test_real_radiographs_pass_every_data_stage_before_the_split(
    s3_env: EmbeddedS3, project_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pydicom-data's computed radiographs, uncompressed and in JPEG 2000: no rescale, 10 and
    15 bits stored, MONOCHROME1, a shuttered tibia. What a clinic's export holds."""
    monkeypatch.setenv("OSTEO_VAULT_KEY_FILE", str(tmp_path / "keys" / "vault.key"))
    names = ["RG1_UNCR.dcm", "RG3_UNCR.dcm", "RG1_J2KI.dcm", "RG3_J2KI.dcm"]
    patients = default_patients()
    annotations = [Annotation(name, patients[n % len(patients)].patient_ref)
                   for n, name in enumerate(names)]
    export = write_export(project_dir / "export", patients, [], annotations)
    for name in names:
        shutil.copy(str(get_testdata_file(name)), export.images_dir / name)
    params = load_params(project_dir)
    params["export"]["path"] = "export"
    layout = Layout(project_dir)

    summaries = [stage.fn(layout, params) for stage in (ingest, pseudonymise, validate,
                                                        preprocess)]

    assert [(s.stage, s.accepted, s.quarantined) for s in summaries] == [
        (s.stage, 4, {}) for s in summaries]
