"""No patient name, reference or birth date reaches the training store, quarantine, reports or logs.

The identifying values are read back from the export itself (patients.csv and every DICOM
header), then searched for, as bytes, in every file the pipeline wrote outside ``work/`` (the
local identifiable area) and in every object of the training store.
"""

from __future__ import annotations

import io
import pickletools
import re
import shutil
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pydicom
import torch
from PIL import Image
from PIL.PngImagePlugin import PngImageFile

from flows.prepare import DATA_STAGES
from osteo import dvc
from osteo.config import bucket, load_access_matrix
from osteo.storage import list_objects, s3_client
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


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TENSOR_STORAGE = re.compile(r"[^/]+/data/\d+")
"""Where torch.save puts a tensor's raw bytes inside its zip archive."""


def readable_text(blob: bytes) -> str:
    """The text a person or program could read out of a file, whatever its format.

    Pixel shards (zip archives of arrays) contribute their member names and dtypes: their raw
    pixel bytes hold no text, and searching them would only find random coincidences. For the
    same reason PNG figures contribute their text chunks (title, software, any metadata), not
    their compressed pixels. Parquet tables contribute every value and their schema metadata.
    Anything else is read as text.
    """
    if blob[:4] == b"PK\x03\x04":
        return _archive_text(blob)
    if blob[:8] == PNG_SIGNATURE:
        with PngImageFile(io.BytesIO(blob)) as figure:
            return "\n".join(f"{key}: {value}" for key, value in figure.text.items())
    if blob[:4] == b"PAR1":
        table = pq.read_table(io.BytesIO(blob))
        metadata = str(table.schema.metadata or "")
        return table.to_pandas().to_csv() + metadata
    return blob.decode("utf-8", errors="ignore") + "\n" + blob.decode("latin-1")


def _archive_text(blob: bytes) -> str:
    """Member names, array dtypes of ``.npy`` members, and the bytes of any other member.

    Pixel shards are zip archives of arrays; a Lightning checkpoint is a zip archive whose
    pickled members (hyperparameters) could hold text, so their strings are all read. Its tensor
    storages (``archive/data/0``, ...) are raw weights, like the pixels of a ``.npy`` member:
    a three-letter name turns up in a few megabytes of random floats by chance, so only their
    names and sizes are kept.
    """
    parts = []
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        for name in archive.namelist():
            parts.append(name)
            with archive.open(name) as member:
                if TENSOR_STORAGE.fullmatch(name):
                    parts.append(f"{archive.getinfo(name).file_size} bytes")
                elif name.endswith(".pkl"):
                    parts.extend(_pickled_strings(member.read()))
                elif name.endswith(".npy"):
                    major, _ = np.lib.format.read_magic(member)
                    read_header = (np.lib.format.read_array_header_1_0 if major == 1
                                   else np.lib.format.read_array_header_2_0)
                    parts.append(str(read_header(member)[2]))
                else:
                    parts.append(member.read().decode("latin-1"))
    return "\n".join(parts)


def _pickled_strings(pickled: bytes) -> list[str]:
    """Every string a pickle holds, read from its opcodes without running it.

    Read as raw text, a pickled string runs into the next opcode (``Ewaq``) and escapes a
    whole-word search.
    """
    return [str(argument) for _, argument, _ in pickletools.genops(pickled)
            if isinstance(argument, (str, bytes))]


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


def test_a_name_in_a_checkpoint_is_found_but_not_in_its_raw_weights() -> None:
    """Checkpoint text (hyperparameters) is searched; bytes of tensor storages are not."""
    weights = torch.frombuffer(bytearray(b" Ewa \x00\x00\x00"), dtype=torch.float32)
    with_name, without_name = io.BytesIO(), io.BytesIO()
    torch.save({"state_dict": {"w": weights}, "hyper_parameters": {"reader": "Ewa"}}, with_name)
    torch.save({"state_dict": {"w": weights}, "hyper_parameters": {}}, without_name)

    assert leaks(with_name.getvalue(), {"Ewa"}) == {"Ewa"}
    assert leaks(without_name.getvalue(), {"Ewa"}) == set()


def _png(row: bytes, text: dict[str, str]) -> bytes:
    """A one-row grey PNG whose pixel bytes are stored unfiltered and uncompressed."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    header = len(row).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    texts = b"".join(chunk(b"tEXt", f"{key}\0{value}".encode("latin-1"))
                     for key, value in text.items())
    pixels = chunk(b"IDAT", zlib.compress(b"\0" + row, level=0))
    return PNG_SIGNATURE + chunk(b"IHDR", header) + texts + pixels + chunk(b"IEND", b"")


def test_a_name_in_a_figures_text_is_found_but_not_in_its_pixels() -> None:
    """PNG text chunks are searched; the pixel data, compressed in real figures, is not."""
    with_name = _png(b" Ewa \0\0\0", {"Title": "recall of Ewa"})
    without_name = _png(b" Ewa \0\0\0", {"Title": "recall"})

    assert b" Ewa " in without_name and Image.open(io.BytesIO(without_name)).size == (8, 1)
    assert leaks(with_name, {"Ewa"}) == {"Ewa"}
    assert leaks(without_name, {"Ewa"}) == set()


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


def test_dvc_copies_nothing_identifiable_into_its_local_cache(
    prepared_project: PreparedProject, tmp_path: Path,
) -> None:
    """Recording the data stages caches no work/ output, not even in DVC's run cache.

    Runs on a copy of the project with an empty cache, so that a test which wipes and pulls the
    session project's cache cannot hide a copy made when the flow recorded its run.
    """
    root = prepared_project.root
    copy = tmp_path / "project"
    shutil.copytree(root, copy, symlinks=True,
                    ignore=lambda folder, _: ["cache"] if Path(folder) == root / ".dvc" else [])
    values = identifying_values(prepared_project.export)

    dvc.commit(copy, *DATA_STAGES)

    cached = [path for path in (copy / ".dvc" / "cache").rglob("*") if path.is_file()]
    found = {str(path): leaks(path.read_bytes(), values) for path in cached}
    assert cached and not {path: hits for path, hits in found.items() if hits}


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


def _bucket_blobs(role: str, store: str) -> dict[str, bytes]:
    client = s3_client(role)
    return {
        item["Key"]: client.get_object(Bucket=bucket(store), Key=item["Key"])["Body"].read()
        for item in list_objects(client, bucket(store))
    }


def test_no_identifier_in_any_store_but_the_vault_and_patient_files(
    trained: object, prepared_project: PreparedProject
) -> None:
    """After both flows: training, retraining, models and audit stores hold no identity."""
    values = identifying_values(prepared_project.export)
    stores = [store for store in load_access_matrix()["stores"]
              if store not in {"identity_vault", "patient_files"}]

    found = {
        f"{store}/{key}": leaks(blob, values)
        for store in stores for key, blob in _bucket_blobs("administrator", store).items()
    }

    assert any(key.startswith("models/") for key in found)
    assert any(key.startswith("audit/") for key in found)
    assert not {key: hits for key, hits in found.items() if hits}


def test_raw_bytes_of_the_vault_hold_no_identifier(
    trained: object, prepared_project: PreparedProject
) -> None:
    """The vault holds identities, but encrypted on the client: its stored bytes reveal none."""
    values = identifying_values(prepared_project.export)
    blobs = _bucket_blobs("administrator", "identity_vault")
    raw = {key: {v for v in values if v.encode() in blob} for key, blob in blobs.items()}

    assert blobs and not {key: hits for key, hits in raw.items() if hits}
