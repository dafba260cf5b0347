"""No patient name, reference or birth date reaches the training store, quarantine, reports or logs.

The identifying values are read back from the export itself (patients.csv and every DICOM
header), then searched for, as bytes, in every file the pipeline wrote outside ``work/`` (the
local identifiable area) and in every object of the training store.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pydicom

from osteo.config import bucket
from osteo.storage import s3_client
from tests.e2e.conftest import PreparedProject


def identifying_values(export: Path) -> set[str]:
    """Every first name, last name, patient reference and birth date of an export."""
    patients = pd.read_csv(export / "patients.csv", dtype=str)
    values = set(patients["first_name"]) | set(patients["last_name"]) | set(patients["patient_ref"])
    for path in (export / "images").glob("*.dcm"):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        birth = str(header.get("PatientBirthDate", ""))
        if birth:
            values |= {birth, f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"}
    return {value for value in values if len(value) >= 3}


def readable_text(blob: bytes) -> str:
    """The text a person or program could read out of a file, whatever its format.

    Pixel shards (zip archives of arrays) contribute their member names and dtypes: their raw
    pixel bytes hold no text, and searching them would only find random coincidences. Parquet
    tables contribute every value and their schema metadata. Anything else is read as text.
    """
    if blob[:4] == b"PK\x03\x04":
        with np.load(io.BytesIO(blob), allow_pickle=False) as shard:
            return " ".join(f"{name} {shard[name].dtype}" for name in shard.files)
    if blob[:4] == b"PAR1":
        table = pq.read_table(io.BytesIO(blob))
        metadata = str(table.schema.metadata or "")
        return table.to_pandas().to_csv() + metadata
    return blob.decode("utf-8", errors="ignore") + "\n" + blob.decode("latin-1")


def leaks(blob: bytes, values: set[str]) -> set[str]:
    """The identifying values that appear as whole words or numbers in a file's text."""
    alternatives = "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
    pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")
    return set(pattern.findall(readable_text(blob))) & values


def test_identifying_values_are_found_in_the_export_itself(
    prepared_project: PreparedProject,
) -> None:
    """The search can fail: the export does contain the values it looks for."""
    values = identifying_values(prepared_project.export)
    patients_csv = (prepared_project.export / "patients.csv").read_bytes()
    header = next((prepared_project.export / "images").glob("*.dcm")).read_bytes()

    assert len(values) > 100
    assert len(leaks(patients_csv, values)) > 100
    assert leaks(header, values)


def test_no_identifier_in_any_file_written_by_the_pipeline(
    prepared_project: PreparedProject,
) -> None:
    values = identifying_values(prepared_project.export)
    root = prepared_project.root
    written = [
        *(root / "data").rglob("*"),
        *(root / "reports").rglob("*"),
        *(root / ".dvc" / "cache").rglob("*"),
        root / "dvc.lock",
        *prepared_project.log_file.parent.rglob("*"),
        *prepared_project.prefect_home.rglob("*"),
    ]

    found = {str(p): leaks(p.read_bytes(), values) for p in written if p.is_file()}

    assert written and not {path: hits for path, hits in found.items() if hits}


def test_no_identifier_in_the_training_store(prepared_project: PreparedProject) -> None:
    values = identifying_values(prepared_project.export)
    client = s3_client("svc_prepare")
    keys = [
        item["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket("training"))
        for item in page.get("Contents", [])
    ]

    found = {}
    for key in keys:
        body = client.get_object(Bucket=bucket("training"), Key=key)["Body"].read()
        found[key] = leaks(body, values)

    assert keys and not {key: hits for key, hits in found.items() if hits}
