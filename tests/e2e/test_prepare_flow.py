"""The data preparation flow end to end, on real Prefect, DVC and SeaweedFS S3."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pandas as pd

from osteo import dvc
from osteo.summary import StageSummary
from tests.e2e.conftest import PreparedProject

STAGES = ["ingest", "pseudonymise", "validate", "preprocess", "split"]


def _digests(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != ".gitignore"  # git's files, not DVC's
    }


def _data_stage_digests(root: Path) -> dict[str, str]:
    """Digests of the files the data stages keep under data/ (the model flow adds its own)."""
    files: list[Path] = []
    for stage in STAGES:
        for out in dvc.lock(root)["stages"][stage]["outs"]:
            path = root / out["path"]
            if out["path"].startswith("data/"):
                files += sorted(path.rglob("*")) if path.is_dir() else [path]
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in files if path.is_file() and path.name != ".gitignore"}


def test_records_in_equal_accepted_plus_quarantined(prepared_project: PreparedProject) -> None:
    summary = prepared_project.summary
    images = len(list((prepared_project.export / "images").iterdir()))

    assert summary.records_in >= images
    assert summary.records_in == summary.accepted + summary.quarantined_total
    assert summary.accepted == len(
        pd.read_parquet(prepared_project.root / "data/split/split.parquet")
    )


def test_every_stage_wrote_its_summary_and_quarantine(prepared_project: PreparedProject) -> None:
    root = prepared_project.root

    for stage in STAGES:
        stage_summary = StageSummary.read(root / "reports" / f"{stage}.json")
        stage_summary.check()
    for stage in ["ingest", "pseudonymise", "validate", "preprocess"]:
        quarantine = pd.read_csv(root / "data" / "quarantine" / f"{stage}.csv")
        assert list(quarantine.columns) == [
            "stage",
            "source",
            "row",
            "record_id",
            "reason",
            "detail",
        ]
    assert "<html" in (root / "reports" / "validation.html").read_text().lower()


def test_non_accredited_reader_annotations_are_quarantined(
    prepared_project: PreparedProject,
) -> None:
    quarantine = pd.read_csv(prepared_project.root / "data" / "quarantine" / "ingest.csv")

    assert quarantine["reason"].str.contains("accredited").any()


def test_no_patient_appears_in_two_splits(prepared_project: PreparedProject) -> None:
    table = pd.read_parquet(prepared_project.root / "data" / "split" / "split.parquet")

    splits_per_patient = table.groupby("patient_id")["split"].nunique()

    assert (splits_per_patient == 1).all()
    assert set(table["split"]) == {"train", "val", "test"}


def test_dvc_records_every_stage_and_is_up_to_date(prepared_project: PreparedProject) -> None:
    root = prepared_project.root

    assert set(STAGES) <= set(dvc.lock(root)["stages"])
    dag = dvc.run_dvc(root, "dag")
    assert all(stage in dag for stage in STAGES)
    status = dvc.run_dvc(root, "status", *STAGES)
    assert "changed" not in status, status
    assert dvc.output_hash(root, "split", "data/split") == prepared_project.summary.data_version


def test_dvc_push_wipe_pull_round_trip_is_byte_identical(prepared_project: PreparedProject) -> None:
    root = prepared_project.root
    before = _data_stage_digests(root)
    assert "in sync" in dvc.run_dvc(root, "status", "--cloud", *STAGES).lower()

    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    dvc.pull(root, *STAGES)

    assert _data_stage_digests(root) == before


def test_dvc_repro_rebuilds_deleted_outputs_identically(prepared_project: PreparedProject) -> None:
    root = prepared_project.root
    before = _digests(root / "data" / "split") | _digests(root / "data" / "prepared")

    shutil.rmtree(root / "data" / "split")
    shutil.rmtree(root / "data" / "prepared")
    output = dvc.run_dvc(root, "repro", "--no-run-cache", "split")

    assert "Running stage 'preprocess'" in output and "Running stage 'ingest'" not in output
    assert _digests(root / "data" / "split") | _digests(root / "data" / "prepared") == before


def test_every_stage_is_in_the_signed_audit_trail(prepared_project: PreparedProject) -> None:
    from osteo.audit import open_log

    log = open_log("s3", role="auditor")
    verification = log.verify()
    actions = [entry.action for entry in log.query(None, None, None)]

    assert verification.ok, verification.reason
    assert all(f"stage.{stage}" in actions for stage in STAGES)
    assert "vault.access" in actions and "dataset.version" in actions
    assert log.who_accessed("data/split/split.parquet")


def test_a_table_with_an_undeclared_field_is_not_versioned(
    prepared_project: PreparedProject,
) -> None:
    import pytest

    from flows.prepare import version_dataset
    from osteo.minimise import UndeclaredFieldError

    root = prepared_project.root
    intruder = root / "data" / "split" / "with_names.parquet"
    table = pd.read_parquet(root / "data" / "split" / "split.parquet")
    table.assign(last_name="x").to_parquet(intruder)
    try:
        with pytest.raises(UndeclaredFieldError, match="last_name"):
            version_dataset.fn(root, push=False)
    finally:
        intruder.unlink()


def test_review_export_is_de_identified_with_the_same_pixels(
    prepared_project: PreparedProject, tmp_path: Path
) -> None:
    import pydicom

    from osteo.config import load_params
    from osteo.layout import Layout
    from tasks.review import export_for_review
    from tests.e2e.test_privacy import identifying_values, leaks

    root = prepared_project.root
    result = export_for_review(Layout(root), load_params(root), tmp_path / "review", None)
    image_map = pd.read_parquet(root / "work" / "pseudonymise" / "image_map.parquet")
    values = identifying_values(prepared_project.export)

    files = sorted((tmp_path / "review").glob("*.dcm"))
    selected = len(pd.read_parquet(root / "data" / "split" / "split.parquet"))
    assert result.written == len(files) > 0
    assert result.written + sum(result.excluded.values()) == selected
    for path in files:
        assert not leaks(path.read_bytes(), values), path.name
        copy = pydicom.dcmread(path)
        source = image_map.loc[image_map["image_id"] == path.stem, "image"].item()
        original = pydicom.dcmread(prepared_project.export / "images" / source)
        assert copy.PixelData == original.PixelData
        assert copy.PatientIdentityRemoved == "YES"
