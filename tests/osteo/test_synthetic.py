"""The synthetic clinic: reproducible exports that follow the export contract and encode T."""

from __future__ import annotations

import csv
import datetime as dt
import logging
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from osteo.cli import app
from osteo.config import ConfigError
from osteo.synthetic import (
    ExportExistsError,
    GenerationSettings,
    generate_export,
    generate_from_params,
    settings_from_params,
)
from osteo.synthetic.dicom import STATIONS, Study, write_dicom
from osteo.synthetic.phantom import (
    cortical_thickness_mm,
    draw_positioning,
    endplate_concavity_mm,
    horizontal_strut_share,
    patient_anatomy,
    render_radiograph,
    trabecular_fraction,
)
from osteo.synthetic.population import age_on, draw_patients

REPO = Path(__file__).resolve().parents[2]
READERS = ["RAD01", "RAD02", "RAD03"]
SMALL: dict[str, Any] = {
    "images_per_patient": (1, 2), "image_size": (128, 104), "reader_error_rate": 0.08,
    "accredited_readers": READERS,
}
IDENTIFYING = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientSize",
    "PatientWeight", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
    "AccessionNumber", "StudyDate", "StudyTime", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "OperatorsName", "StationName", "BodyPartExamined",
)
IMAGE_ATTRIBUTES = (
    "Modality", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
    "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth", "PixelSpacing",
    "BurnedInAnnotation",
)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def header(path: Path) -> list[str]:
    with path.open(encoding="utf-8", newline="") as handle:
        return next(csv.reader(handle))


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small export of 40 patients with 15 % PNG images."""
    out = tmp_path_factory.mktemp("clinic") / "export"
    generate_export(out, seed=11, patients=40, png_fraction=0.15, **SMALL)
    return out


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, str]]]:
    """Tables only (no radiographs) of 800 patients, joined with their ground truth."""
    out = tmp_path_factory.mktemp("population") / "export"
    generate_export(out, seed=5, patients=800, png_fraction=0.0, write_images=False, **SMALL)
    return {
        "patients": read_csv(out / "patients.csv"),
        "annotations": read_csv(out / "annotations.csv"),
        "truth": read_csv(out.parent / "export.truth.csv"),
    }


def dicom_files(export: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path) for path in sorted((export / "images").glob("*.dcm"))]


# ---------------------------------------------------------------- reproducibility


def test_same_seed_gives_byte_identical_export_and_truth(tmp_path: Path) -> None:
    settings: dict[str, Any] = dict(SMALL, image_size=(96, 80), png_fraction=0.3)
    generate_export(tmp_path / "a" / "export", seed=3, patients=12, **settings)
    generate_export(tmp_path / "b" / "export", seed=3, patients=12, **settings)
    generate_export(tmp_path / "c" / "export", seed=4, patients=12, **settings)

    first, second = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert first == second
    assert any(name.endswith(".png") for name in first)
    assert any(name.endswith(".dcm") for name in first)
    assert files_of(tmp_path / "c")["export/patients.csv"] != first["export/patients.csv"]


def test_tables_do_not_depend_on_rendering_images(tmp_path: Path, export: Path) -> None:
    generate_export(tmp_path / "export", seed=11, patients=40, png_fraction=0.15,
                    write_images=False, **SMALL)

    for name in ("patients.csv", "annotations.csv"):
        assert (tmp_path / "export" / name).read_bytes() == (export / name).read_bytes()
    assert not (tmp_path / "export" / "images").exists()


# ---------------------------------------------------------------- export contract


def test_tables_follow_the_export_contract(export: Path) -> None:
    assert header(export / "patients.csv") == [
        "patient_ref", "first_name", "last_name", "age", "sex", "bmi"]
    assert header(export / "annotations.csv") == [
        "image", "patient_ref", "reader_id", "label", "annotated_at"]
    patients = read_csv(export / "patients.csv")
    annotations = read_csv(export / "annotations.csv")

    refs = [p["patient_ref"] for p in patients]
    assert len(refs) == 40 == len(set(refs))
    assert all(re.fullmatch(r"H\d{7}", ref) for ref in refs)
    assert {p["sex"] for p in patients} <= {"F", "M"}
    assert all(50 <= int(p["age"]) <= 95 and 16 <= float(p["bmi"]) <= 55 for p in patients)
    assert {a["label"] for a in annotations} == {"osteoporosis", "normal"}
    assert {a["patient_ref"] for a in annotations} == set(refs)
    assert all(dt.datetime.fromisoformat(a["annotated_at"]) for a in annotations)


def test_image_files_are_unique_non_identifying_and_all_annotated(export: Path) -> None:
    files = sorted(p.name for p in (export / "images").iterdir())
    annotated = {a["image"] for a in read_csv(export / "annotations.csv")}

    assert all(re.fullmatch(r"IMG\d{6}\.(dcm|png)", name) for name in files)
    assert set(files) == annotated
    assert len({name[:-4] for name in files}) == len(files)


def test_patient_names_include_accents_apostrophes_and_quotes(population: dict) -> None:
    names = [p["first_name"] + " " + p["last_name"] for p in population["patients"]]

    assert any(not name.isascii() for name in names)
    assert any("'" in name for name in names)
    assert any('"' in name for name in names)
    assert any("," in name for name in names)


# ---------------------------------------------------------------- population and truth


def test_prevalence_by_sex_matches_a_screening_population(population: dict) -> None:
    patients = population["patients"]
    label = {t["patient_ref"]: t["true_label"] for t in population["truth"]}
    women = [p for p in patients if p["sex"] == "F"]
    men = [p for p in patients if p["sex"] == "M"]

    def prevalence(group: list[dict[str, str]]) -> float:
        return sum(label[p["patient_ref"]] == "osteoporosis" for p in group) / len(group)

    assert 0.58 <= len(women) / len(patients) <= 0.72
    assert 0.13 <= prevalence(women) <= 0.27
    assert 0.005 <= prevalence(men) <= 0.09


def test_t_score_falls_with_age_faster_for_women_and_rises_with_bmi(population: dict) -> None:
    t_score = {t["patient_ref"]: float(t["t_score"]) for t in population["truth"]}
    patients = population["patients"]

    def slope(sex: str, column: str) -> float:
        group = [p for p in patients if p["sex"] == sex]
        x = np.array([float(p[column]) for p in group])
        y = np.array([t_score[p["patient_ref"]] for p in group])
        return float(np.polyfit(x, y, 1)[0])

    assert slope("F", "age") < slope("M", "age") < 0
    assert slope("F", "bmi") > 0


def test_truth_file_is_outside_the_export_and_applies_the_who_rule(export: Path) -> None:
    truth_path = export.parent / "export.truth.csv"
    truth = read_csv(truth_path)
    files = {p.name for p in (export / "images").iterdir()}

    assert not truth_path.resolve().is_relative_to(export.resolve())
    assert header(truth_path) == ["image", "patient_ref", "t_score", "true_label"]
    assert {t["image"] for t in truth} == files
    for row in truth:
        expected = "osteoporosis" if float(row["t_score"]) <= -2.5 else "normal"
        assert row["true_label"] == expected


def test_truth_inside_the_export_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="outside the export"):
        generate_export(tmp_path / "export", seed=1, patients=3, png_fraction=0.0,
                        truth_path=tmp_path / "export" / "truth.csv", **SMALL)


# ---------------------------------------------------------------- readers


def test_first_two_readers_disagreeing_brings_a_third_accredited_reader(export: Path) -> None:
    readings: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in read_csv(export / "annotations.csv"):
        if row["reader_id"] in READERS:
            readings[row["image"]].append(row)

    counts: Counter[int] = Counter()
    for rows in readings.values():
        rows.sort(key=lambda r: r["annotated_at"])
        disagree = rows[0]["label"] != rows[1]["label"]
        assert len(rows) == (3 if disagree else 2)
        assert len({r["reader_id"] for r in rows}) == len(rows)
        counts[len(rows)] += 1
    assert counts[2] > 0 and counts[3] > 0


def test_unaccredited_trainee_reads_some_images_with_many_errors(population: dict) -> None:
    truth = {t["image"]: t["true_label"] for t in population["truth"]}
    trainee = [a for a in population["annotations"] if a["reader_id"] == "TRAINEE7"]
    accredited = [a for a in population["annotations"] if a["reader_id"] in READERS]

    def error_rate(rows: list[dict[str, str]]) -> float:
        return sum(r["label"] != truth[r["image"]] for r in rows) / len(rows)

    assert 0.10 <= len(trainee) / len(truth) <= 0.20
    assert error_rate(trainee) > 0.25
    assert error_rate(accredited) < 0.15
    assert {a["reader_id"] for a in population["annotations"]} == {*READERS, "TRAINEE7"}


def test_accredited_readers_err_at_the_configured_rate_on_borderline_cases(
    population: dict,
) -> None:
    """Readers perceive the T-score with an error: they miss borderline cases, not clear ones."""
    t_score = {t["image"]: float(t["t_score"]) for t in population["truth"]}
    truth = {t["image"]: t["true_label"] for t in population["truth"]}
    readings = [a for a in population["annotations"] if a["reader_id"] in READERS]
    wrong = [a for a in readings if a["label"] != truth[a["image"]]]
    distance = [abs(t_score[a["image"]] + 2.5) for a in wrong]

    # Adjudications are third readings of disputed, hence borderline, images: a bit more often
    # wrong than the 0.08 of first readings.
    assert 0.05 <= len(wrong) / len(readings) <= 0.15
    assert sum(d < 1.0 for d in distance) / len(distance) >= 0.8
    assert max(distance) < 2.5


def test_reader_error_rate_zero_gives_unanimous_true_labels(tmp_path: Path) -> None:
    settings: dict[str, Any] = dict(SMALL, reader_error_rate=0.0)
    summary = generate_export(tmp_path / "export", seed=2, patients=60, png_fraction=0.0,
                              write_images=False, **settings)
    truth = {t["image"]: t["true_label"] for t in read_csv(tmp_path / "export.truth.csv")}
    annotations = read_csv(tmp_path / "export" / "annotations.csv")

    assert summary.adjudications == 0
    assert all(a["label"] == truth[a["image"]] for a in annotations if a["reader_id"] in READERS)


# ---------------------------------------------------------------- DICOM and PNG


def test_dicom_files_carry_identifying_attributes_and_decode(export: Path) -> None:
    patients = {p["patient_ref"]: p for p in read_csv(export / "patients.csv")}
    datasets = dicom_files(export)

    assert datasets
    for ds in datasets:
        assert all(name in ds and str(ds[name].value) != "" for name in IDENTIFYING)
        assert all(name in ds for name in IMAGE_ATTRIBUTES)
        patient = patients[ds.PatientID]
        assert str(ds.PatientName) == f"{patient['last_name']}^{patient['first_name']}"
        assert ds.PatientAge == f"{int(patient['age']):03d}Y"
        assert ds.private_block(0x0011, "CHT PATIENT FILE")[0x10].value == ds.PatientID
        assert ds.Modality in {"CR", "DX"} and ds.BurnedInAnnotation == "NO"
        assert ds.BitsAllocated == 16 and ds.BitsStored in {12, 14}
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        pixels = ds.pixel_array
        assert pixels.shape == (128, 104) and int(pixels.max()) < 2**ds.BitsStored
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert {ds.PhotometricInterpretation for ds in datasets} == {"MONOCHROME1", "MONOCHROME2"}
    assert {int(ds.BitsStored) for ds in datasets} == {12, 14}


def test_birth_date_is_consistent_with_age_at_the_study(export: Path) -> None:
    for ds in dicom_files(export):
        birth = dt.datetime.strptime(ds.PatientBirthDate, "%Y%m%d").date()
        study = dt.datetime.strptime(ds.StudyDate, "%Y%m%d").date()
        assert age_on(birth, study) == int(ds.PatientAge[:3])


def test_monochrome1_stores_the_inverted_radiograph(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    patient = draw_patients(1, rng)[0]
    anatomy = patient_anatomy(patient.t_score, patient.bmi, patient.sex, rng)
    radiograph = render_radiograph(anatomy, draw_positioning(rng), (96, 80), 12, rng)
    normal = next(s for s in STATIONS if s.photometric == "MONOCHROME2" and s.bits_stored == 12)
    inverted = next(s for s in STATIONS if s.photometric == "MONOCHROME1")
    decoded = {}
    for station in (normal, inverted):
        study = Study(station, "1.2.3", "1.2.3.4", "A1", "1", "Dr^Who", "Op^One")
        write_dicom(tmp_path / f"{station.name}.dcm", radiograph, patient, study, 1, "1.2.3.5")
        decoded[station.photometric] = pydicom.dcmread(tmp_path / f"{station.name}.dcm")

    m1, m2 = decoded["MONOCHROME1"], decoded["MONOCHROME2"]
    assert np.array_equal(m1.pixel_array, 4095 - m2.pixel_array.astype(np.int32))
    stored_centre_m1 = (float(m1.WindowCenter) - float(m1.RescaleIntercept)) / float(
        m1.RescaleSlope)
    stored_centre_m2 = (float(m2.WindowCenter) - float(m2.RescaleIntercept)) / float(
        m2.RescaleSlope)
    assert stored_centre_m1 == pytest.approx(4095 - stored_centre_m2, abs=0.5)


def test_png_images_are_16_bit_grayscale(export: Path) -> None:
    pngs = sorted((export / "images").glob("*.png"))
    images = len(list((export / "images").iterdir()))

    assert len(pngs) == round(0.15 * images)
    for path in pngs:
        with Image.open(path) as image:
            assert image.mode in {"I;16", "I"}
            pixels = np.asarray(image)
        assert pixels.shape == (128, 104) and int(pixels.max()) > 4095


# ---------------------------------------------------------------- the image encodes the T-score


def test_bone_functions_are_monotone_in_t_score() -> None:
    grid = np.linspace(-6, 3, 50)

    for rising in (trabecular_fraction, cortical_thickness_mm, horizontal_strut_share):
        assert np.all(np.diff([rising(t) for t in grid]) > 0)
    assert np.all(np.diff([endplate_concavity_mm(t) for t in grid]) < 0)


def test_trabecular_attenuation_in_stored_images_tracks_t_score(tmp_path: Path) -> None:
    # Radiographs of a screening population go through DICOM and back, MONOCHROME1 included,
    # as the pipeline will read them; the bone-minus-disc attenuation must follow the T-score.
    rng = np.random.default_rng(42)
    patients = draw_patients(60, rng)
    t_scores, contrasts = [], []
    for i, patient in enumerate(patients):
        station = STATIONS[i % len(STATIONS)]
        anatomy = patient_anatomy(patient.t_score, patient.bmi, patient.sex, rng)
        radiograph = render_radiograph(anatomy, draw_positioning(rng), (256, 208),
                                       station.bits_stored, rng)
        path = tmp_path / f"{i}.dcm"
        write_dicom(path, radiograph, patient, Study(station, "1.2", "1.2.1", "A", "1", "R", "O"),
                    1, f"1.2.1.{i}")
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(float) / (2**ds.BitsStored - 1)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            pixels = 1.0 - pixels
        contrast = pixels[radiograph.trabecular_mask].mean() - pixels[radiograph.disc_mask].mean()
        t_scores.append(patient.t_score)
        contrasts.append(contrast)

    assert abs(np.corrcoef(t_scores, contrasts)[0, 1]) >= 0.8


# ---------------------------------------------------------------- settings and safety


def test_existing_export_is_kept_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "export"
    (out / "images").mkdir(parents=True)
    (out / "images" / "IMG999999.dcm").write_bytes(b"stale")

    with pytest.raises(ExportExistsError, match="--force"):
        generate_export(out, seed=1, patients=3, png_fraction=0.0, **SMALL)
    assert (out / "images" / "IMG999999.dcm").exists()

    generate_export(out, seed=1, patients=3, png_fraction=0.0, force=True, **SMALL)
    assert not (out / "images" / "IMG999999.dcm").exists()
    assert (out / "patients.csv").exists()


@pytest.mark.parametrize(("change", "named"), [
    ({"images_per_patient": (0, 2)}, "generate.images_per_patient"),
    ({"reader_error_rate": 0.7}, "generate.reader_error_rate"),
    ({"accredited_readers": ["RAD01"]}, "readers.accredited"),
    ({"png_fraction": 1.5}, "generate.png_fraction"),
])
def test_unusable_settings_are_refused_naming_the_setting(
    tmp_path: Path, change: dict, named: str
) -> None:
    settings = {**SMALL, "png_fraction": 0.0, **change}
    with pytest.raises(ConfigError, match=re.escape(named)):
        generate_export(tmp_path / "export", seed=1, patients=3, **settings)
    assert not (tmp_path / "export").exists()


def test_settings_are_read_from_the_repository_params() -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())

    settings = settings_from_params(params)

    assert settings == GenerationSettings(
        seed=params["generate"]["seed"],
        patients=params["generate"]["patients"],
        images_per_patient=tuple(params["generate"]["images_per_patient"]),
        image_size=tuple(params["generate"]["image_size"]),
        reader_error_rate=params["generate"]["reader_error_rate"],
        png_fraction=params["generate"]["png_fraction"],
        accredited_readers=tuple(params["readers"]["accredited"]),
    )


def test_generate_from_params_applies_overrides(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())

    summary = generate_from_params(params, tmp_path / "export", patients=7, seed=None,
                                   write_images=False)

    assert summary.patients == 7 == len(read_csv(tmp_path / "export" / "patients.csv"))
    assert summary.truth_path == (tmp_path / "export.truth.csv").resolve()


def test_generation_logs_no_identifying_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="osteo"):
        generate_export(tmp_path / "export", seed=9, patients=5, png_fraction=0.0,
                        write_images=False, **SMALL)
    patients = read_csv(tmp_path / "export" / "patients.csv")

    assert caplog.records
    for patient in patients:
        for value in (patient["patient_ref"], patient["last_name"]):
            assert value not in caplog.text


# ---------------------------------------------------------------- command line


def test_generate_help_lists_its_options() -> None:
    result = CliRunner().invoke(app, ["generate", "--help"])

    assert result.exit_code == 0
    for option in ("--patients", "--seed", "--truth", "--png-fraction", "--params", "--force"):
        assert option in result.output


def test_generate_command_writes_a_tiny_export_and_refuses_to_overwrite(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["generate"]["image_size"] = [64, 52]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out, truth = tmp_path / "exports" / "tiny", tmp_path / "truth" / "tiny.csv"
    command = ["generate", str(out), "--patients", "4", "--seed", "2", "--png-fraction", "0.5",
               "--truth", str(truth), "--params", str(tmp_path / "params.yaml")]

    first = CliRunner().invoke(app, command)
    again = CliRunner().invoke(app, command)

    assert first.exit_code == 0, first.output
    assert "generated 4 patients" in first.output and str(truth) in first.output
    assert len(read_csv(out / "patients.csv")) == 4 and truth.exists()
    assert any(p.suffix == ".png" for p in (out / "images").iterdir())
    assert again.exit_code == 2
    assert "not empty" in again.output and "Traceback" not in again.output

