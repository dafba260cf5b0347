"""Minimisation (control 4.22): a store only receives the fields declared in infra/fields.yaml."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from botocore.exceptions import ClientError

from osteo.config import bucket, load_access_matrix
from osteo.minimise import (
    UndeclaredFieldError,
    check_fields,
    check_file,
    declared_fields,
    load_fields,
    write_table,
)
from osteo.quarantine import COLUMNS as QUARANTINE_COLUMNS
from osteo.seaweed import EmbeddedS3
from osteo.storage import s3_client

IDENTITY_FIELDS = {"patient_ref", "first_name", "last_name", "birth_date", "name"}

# The tables of the shared dataset contracts, as each stage writes them.
TRAINING_TABLES = {
    "data/pseudonymised/records.parquet": [
        "image_id", "patient_id", "age", "sex", "bmi", "label", "n_readers",
        "reader_agreement", "modality", "photometric", "bits_stored", "rescale_slope",
        "rescale_intercept", "window_center", "window_width", "rows", "columns", "shard"],
    "data/prepared/records.parquet": [
        "image_id", "patient_id", "age", "sex", "bmi", "label", "shard"],
    "data/split/split.parquet": ["image_id", "patient_id", "split"],
    "data/oracle/ground_truth.parquet": ["image_id", "t_score", "true_label"],
    "data/quarantine/ingest.csv": QUARANTINE_COLUMNS,
}


def pseudonymised_frame() -> pd.DataFrame:
    return pd.DataFrame({"image_id": ["I0123456789abcdef"], "patient_id": ["P0123456789abcdef"],
                         "age": [71.0], "sex": ["F"], "bmi": [22.5], "label": ["normal"]})


def test_table_with_a_last_name_is_refused_for_the_training_store(tmp_path: Path) -> None:
    frame = pseudonymised_frame().assign(last_name=["Dupont"])
    target = tmp_path / "data" / "prepared" / "records.parquet"

    with pytest.raises(UndeclaredFieldError) as refused:
        write_table("training", frame, target)

    message = str(refused.value)
    assert "training" in message and "last_name" in message and str(target) in message
    assert "Dupont" not in message
    assert not target.exists()


def test_declared_fields_are_written_and_read_back(tmp_path: Path) -> None:
    target = tmp_path / "records.parquet"

    written = write_table("training", pseudonymised_frame(), target)

    assert written == str(target)
    assert list(pd.read_parquet(target).columns) == list(pseudonymised_frame().columns)


@pytest.mark.parametrize(("source", "columns"), list(TRAINING_TABLES.items()))
def test_every_table_of_the_dataset_contract_is_declared(source: str, columns: list[str]) -> None:
    check_fields("training", columns, source)


def test_no_store_of_pseudonymised_data_may_hold_an_identity_field() -> None:
    for store in ("training", "retraining", "models", "audit"):
        assert not declared_fields(store) & IDENTITY_FIELDS, store


def test_patient_files_may_hold_identity_fields() -> None:
    assert {"patient_ref", "first_name", "last_name", "birth_date"} <= declared_fields(
        "patient_files")


def test_every_store_of_the_access_matrix_has_a_declaration() -> None:
    assert set(load_fields()) == set(load_access_matrix()["stores"])


def test_csv_with_a_first_name_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cases.csv"
    pd.DataFrame({"image_id": ["I0123456789abcdef"], "first_name": ["Jeanne"]}).to_csv(
        path, index=False)

    with pytest.raises(UndeclaredFieldError, match="first_name") as refused:
        check_file("retraining", path)

    assert refused.value.source == str(path) and refused.value.store == "retraining"


def test_index_written_by_pandas_is_not_taken_for_a_field(tmp_path: Path) -> None:
    path = tmp_path / "indexed.parquet"
    pseudonymised_frame().set_index("image_id").to_parquet(path)

    check_file("training", path)


@pytest.mark.s3
def test_table_written_to_the_store_checks_first(s3_env: EmbeddedS3) -> None:
    key = "minimise/records.parquet"
    refused_key = "minimise/refused.parquet"

    written = write_table("training", pseudonymised_frame(), key, role="svc_prepare")
    with pytest.raises(UndeclaredFieldError):
        write_table("training", pseudonymised_frame().assign(birth_date=["19520317"]),
                    refused_key, role="svc_prepare")

    client = s3_client("svc_prepare")
    assert written == f"s3://{bucket('training')}/{key}"
    assert client.head_object(Bucket=bucket("training"), Key=key)["ContentLength"] > 0
    with pytest.raises(ClientError):
        client.head_object(Bucket=bucket("training"), Key=refused_key)
