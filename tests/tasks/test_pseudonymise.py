"""Pseudonymise: random stable pseudonyms in the identity vault, no identity anywhere downstream."""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest
from PIL import Image

from osteo.config import ConfigError, load_params
from osteo.layout import Layout
from osteo.seaweed import EmbeddedS3
from osteo.shards import read_shard, shard_members, shard_paths
from osteo.summary import StageSummary
from osteo.vault import IdentityVault
from tasks.ingest import ingest
from tasks.preprocess import to_model_input
from tasks.pseudonymise import (
    RECORD_COLUMNS,
    ground_truth_path,
    image_map_path,
    pseudonymise,
    translate_ground_truth,
)
from tests.exports import Export, sample_pixels, write_csv, write_export


@dataclass
class Project:
    """A project with the tiny export, its parameters, and a private vault key file."""

    root: Path
    export: Export
    params: dict[str, Any]

    @property
    def layout(self) -> Layout:
        return Layout(self.root)

    def ingest(self) -> StageSummary:
        summary: StageSummary = ingest.fn(self.layout, self.params)
        return summary

    def pseudonymise(self) -> StageSummary:
        summary: StageSummary = pseudonymise.fn(self.layout, self.params)
        return summary

    def records(self) -> pd.DataFrame:
        return pd.read_parquet(self.layout.pseudonymised_records)

    def image_map(self) -> dict[str, str]:
        frame = pd.read_parquet(image_map_path(self.layout))
        return dict(zip(frame["image"], frame["image_id"], strict=True))

    def by_image(self) -> pd.DataFrame:
        """Pseudonymised records indexed by export file name (through the local image map)."""
        names = {image_id: name for name, image_id in self.image_map().items()}
        records = self.records()
        return records.set_index(records["image_id"].map(names))


@pytest.fixture()
def project(
    project_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Project:
    monkeypatch.setenv("OSTEO_VAULT_KEY_FILE", str(tmp_path / "keys" / "vault.key"))
    params = load_params(project_dir)
    params["export"]["path"] = "export"
    params["preprocess"]["shard_size"] = 2
    return Project(project_dir, write_export(project_dir / "export"), params)


def readable_text(path: Path) -> str:
    """What a program can read from a file: shard member names, parquet values, or text."""
    blob = path.read_bytes()
    if blob[:4] == b"PK\x03\x04":
        with np.load(io.BytesIO(blob), allow_pickle=False) as shard:
            return " ".join(shard.files)
    if blob[:4] == b"PAR1":
        table = pq.read_table(io.BytesIO(blob))
        return table.to_pandas().to_csv() + str(table.schema.metadata)
    return blob.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------- outputs


@pytest.mark.s3
def test_records_have_the_contract_columns_and_display_attributes(
    s3_env: EmbeddedS3, project: Project
) -> None:
    project.ingest()

    summary = project.pseudonymise()

    records = project.by_image()
    assert list(project.records().columns) == RECORD_COLUMNS
    assert summary.records_in == summary.accepted == 5
    assert records["image_id"].str.fullmatch(r"I[0-9a-f]{16}").all()
    assert records["patient_id"].str.fullmatch(r"P[0-9a-f]{16}").all()
    dicom, png = records.loc["IMG0001.dcm"], records.loc["IMG0004.png"]
    assert (dicom["modality"], dicom["photometric"], dicom["bits_stored"]) == (
        "CR", "MONOCHROME1", 10
    )
    assert (dicom["window_center"], dicom["window_width"], dicom["rescale_slope"]) == (
        512.0, 1024.0, 1.0
    )
    assert (dicom["rows"], dicom["columns"]) == (32, 26)
    assert png["modality"] is None and png["photometric"] == "MONOCHROME2"
    assert np.isnan(png["window_center"]) and png["bits_stored"] == 16
    assert records.loc["IMG0003.dcm", "label"] == "normal"
    assert summary.extra["shards"] == 3


@pytest.mark.s3
def test_pixels_are_the_model_inputs_of_the_stored_values(
    s3_env: EmbeddedS3, project: Project,
) -> None:
    project.ingest()
    project.pseudonymise()

    records = project.by_image()
    size = project.params["preprocess"]["size"]
    for spec in project.export.images:
        shard_path = project.layout.pseudonymised_pixel_dir / records.at[spec.name, "shard"]
        with read_shard(shard_path) as shard:
            pixels = shard[records.at[spec.name, "member"]]
        path = project.export.images_dir / spec.name
        stored = (pydicom.dcmread(path).pixel_array if spec.format == "dicom"
                  else np.asarray(Image.open(path)))
        if spec.name == "IMG0004.png":
            np.testing.assert_array_equal(stored, sample_pixels(seed=4))
        expected = to_model_input(stored, records.loc[spec.name].to_dict(), size)
        assert pixels.dtype == np.float16 and pixels.shape == (size, size)
        np.testing.assert_array_equal(pixels, expected)


@pytest.mark.s3
def test_shards_are_published_without_a_copy_and_name_no_export_file(
    s3_env: EmbeddedS3, project: Project
) -> None:
    project.ingest()
    project.pseudonymise()

    published = shard_paths(project.layout.pseudonymised_pixel_dir)
    members = [member for path in published for member in shard_members(path)]
    assert [path.name for path in published] == [
        path.name for path in shard_paths(project.layout.ingest_pixel_dir)]
    assert all(path.samefile(project.layout.ingest_pixel_dir / path.name) for path in published)
    assert sorted(members) == sorted(project.records()["member"])
    assert not [member for member in members if "IMG" in member]


@pytest.mark.s3
def test_records_are_ordered_by_image_id_not_by_export_file_name(
    s3_env: EmbeddedS3, project: Project
) -> None:
    project.ingest()
    project.pseudonymise()

    image_ids = list(project.records()["image_id"])

    assert image_ids == sorted(image_ids)


# ---------------------------------------------------------------------------------- pseudonyms


@pytest.mark.s3
def test_pseudonyms_are_stable_across_runs_and_differ_between_patients(
    s3_env: EmbeddedS3, project: Project
) -> None:
    project.ingest()
    first_summary = project.pseudonymise()
    first = project.by_image()[["image_id", "patient_id"]]

    project.ingest()
    second_summary = project.pseudonymise()
    second = project.by_image()[["image_id", "patient_id"]]

    pd.testing.assert_frame_equal(first.sort_index(), second.sort_index())
    assert (first_summary.extra["new_patients"], first_summary.extra["new_images"]) == (3, 5)
    assert (second_summary.extra["new_patients"], second_summary.extra["new_images"]) == (0, 0)
    patients = first["patient_id"]
    assert patients["IMG0001.dcm"] == patients["IMG0002.dcm"]
    assert patients["IMG0003.dcm"] == patients["IMG0004.png"]
    assert len({patients["IMG0001.dcm"], patients["IMG0003.dcm"], patients["IMG0005.dcm"]}) == 3


@pytest.mark.s3
def test_the_identity_vault_alone_holds_the_correspondence(
    s3_env: EmbeddedS3, project: Project
) -> None:
    project.ingest()
    project.pseudonymise()
    vault = IdentityVault.open(project.root)

    patient_ids = project.by_image()["patient_id"]

    for patient, image in zip(project.export.patients, ["IMG0001.dcm", "IMG0004.png",
                                                        "IMG0005.dcm"], strict=True):
        entry = vault.find_patient(patient.patient_ref)
        assert entry is not None
        assert entry["pseudonym"] == patient_ids[image]
        assert (entry["first_name"], entry["last_name"], entry["birth_date"]) == (
            patient.first_name, patient.last_name, patient.birth_date
        )


@pytest.mark.s3
def test_nothing_under_data_and_reports_holds_a_name_reference_or_birth_date(
    s3_env: EmbeddedS3, project: Project, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    project.ingest()
    project.pseudonymise()
    translate_ground_truth(project.layout, write_csv(
        project.root / "truth.csv", ["image", "patient_ref", "t_score", "true_label"],
        [{"image": "IMG0001.dcm", "patient_ref": "HOSP-000101", "t_score": "-2.9",
          "true_label": "osteoporosis"}],
    ))
    values = project.export.identifying_values()

    written = [p for d in ("data", "reports") for p in (project.root / d).rglob("*")
               if p.is_file()]
    texts = {str(p): readable_text(p) for p in written} | {"log": caplog.text}

    assert any(p.suffix == ".npz" for p in written) and any(p.suffix == ".parquet" for p in written)
    found = {name: [v for v in values if re.search(rf"(?<!\w){re.escape(v)}(?!\w)", text)]
             for name, text in texts.items()}
    assert not {name: hits for name, hits in found.items() if hits}
    assert "IMG000" not in texts[str(project.layout.quarantine("pseudonymise"))]


# ---------------------------------------------------------------------------------- quarantine


@pytest.mark.s3
def test_pixels_lost_after_ingest_are_quarantined_by_image_id(
    s3_env: EmbeddedS3, project: Project
) -> None:
    project.ingest()
    shard = pd.read_parquet(project.layout.ingested_records).set_index("image")
    (project.layout.ingest_pixel_dir / shard.at["IMG0005.dcm", "pixel_shard"]).unlink()

    summary = project.pseudonymise()

    quarantine = pd.read_csv(project.layout.quarantine("pseudonymise"))
    assert summary.quarantined == {"missing_pixels": 1} and summary.accepted == 4
    assert list(quarantine["record_id"]) == [project.image_map()["IMG0005.dcm"]]
    assert "IMG000" not in quarantine.to_csv()
    assert project.image_map()["IMG0005.dcm"] not in set(project.records()["image_id"])


@pytest.mark.s3
def test_the_export_images_are_not_read_again(s3_env: EmbeddedS3, project: Project) -> None:
    """Ingest decoded each image once; pseudonymise works from its local shards only."""
    project.ingest()
    for path in project.export.images_dir.iterdir():
        path.unlink()

    summary = project.pseudonymise()

    assert summary.accepted == 5 and summary.quarantined == {}


# ---------------------------------------------------------------------------------- oracle


@pytest.mark.s3
def test_ground_truth_is_translated_to_image_ids_of_pseudonymised_images(
    s3_env: EmbeddedS3, project: Project
) -> None:
    project.ingest()
    project.pseudonymise()
    truth = write_csv(
        project.root / "export.truth.csv", ["image", "patient_ref", "t_score", "true_label"],
        [{"image": "IMG0001.dcm", "patient_ref": "HOSP-000101", "t_score": "-2.9",
          "true_label": "osteoporosis"},
         {"image": "IMG0003.dcm", "patient_ref": "HOSP-000102", "t_score": "-0.4",
          "true_label": "normal"},
         {"image": "IMG0042.dcm", "patient_ref": "HOSP-000102", "t_score": "-1.0",
          "true_label": "normal"}],
    )

    path = translate_ground_truth(project.layout, truth)

    oracle = pd.read_parquet(path).set_index("image_id")
    image_ids = project.image_map()
    assert path == ground_truth_path(project.layout)
    assert list(oracle.columns) == ["t_score", "true_label"]
    assert oracle.to_dict("index") == {
        image_ids["IMG0001.dcm"]: {"t_score": -2.9, "true_label": "osteoporosis"},
        image_ids["IMG0003.dcm"]: {"t_score": -0.4, "true_label": "normal"},
    }


# ---------------------------------------------------------------------------------- configuration


def test_pseudonymise_before_ingest_is_a_config_error(project: Project) -> None:
    with pytest.raises(ConfigError, match="run the ingest stage first"):
        project.pseudonymise()


def test_world_readable_key_file_stops_the_stage(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "shared.key"
    key_file.write_text("{}")
    key_file.chmod(0o644)
    monkeypatch.setenv("OSTEO_VAULT_KEY_FILE", str(key_file))
    project.ingest()

    with pytest.raises(ConfigError, match="accessible to other users"):
        project.pseudonymise()

    assert not project.layout.pseudonymised_records.exists()
