"""Pseudonymise: replace patient identities by random pseudonyms kept in the identity vault.

Control 4.15 (pseudonymise data coming from the historical patient). Names and patient
references are replaced by a random pseudonym per patient (``P`` + 16 hex digits) and every
image gets a random id (``I`` + 16 hex digits, keyed by the sha256 of its file). Both are
stable across runs because the correspondence is kept in the identity vault
(``osteo.vault``: client-side encrypted, in the ``identity_vault`` store, reached as the
``svc_pseudonymise`` role) and nowhere else. DICOM headers are reduced to the display
attributes training needs; the stored pixel values are decoded once and kept as uint16.

Reads    work/ingest/records.parquet, the export's images/ (``export.path``)
Writes   data/pseudonymised/records.parquet      no name, reference or birth date
         data/pseudonymised/pixels/shard-*.npz   stored pixel values (uint16) by image id
         data/quarantine/pseudonymise.csv        images whose pixels could not be decoded
         reports/pseudonymise.json               counts (unit ``image``)
         work/pseudonymise/image_map.parquet     export file name -> image id (local only)

Rows of the records table and images of the shards are ordered by image id, so their order
does not follow the export's file names. Each image file is read once; its sha256 is checked
against the one ingest recorded, so a file changed between the two stages is quarantined
instead of being pseudonymised under the wrong identity. Quarantine rows name the image by its
image id only (reasons ``missing_image``, ``changed_since_ingest``, ``undecodable_pixels``,
``unsupported_image``); the local image map leads back to the export file.

For synthetic exports, ``translate_ground_truth`` writes data/oracle/ground_truth.parquet
(image_id, t_score, true_label) from the generator's ground truth CSV, for the oracle AUC.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from osteo.config import ConfigError
from osteo.layout import Layout
from osteo.progress import track
from osteo.quarantine import Quarantine
from osteo.shards import ShardWriter
from osteo.summary import StageSummary
from osteo.vault import IdentityVault, PatientIdentity
from tasks.ingest import ExportError, export_directory

logger = logging.getLogger(__name__)

STAGE = "pseudonymise"
DISPLAY_FLOATS = ("rescale_slope", "rescale_intercept", "window_center", "window_width")
RECORD_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("patient_id", pa.string()), ("age", pa.float64()),
    ("sex", pa.string()), ("bmi", pa.float64()), ("label", pa.string()),
    ("n_readers", pa.int64()), ("reader_agreement", pa.float64()), ("modality", pa.string()),
    ("photometric", pa.string()), ("bits_stored", pa.int64()),
    *[(column, pa.float64()) for column in DISPLAY_FLOATS],
    ("rows", pa.int64()), ("columns", pa.int64()), ("shard", pa.string()),
])
RECORD_COLUMNS = RECORD_SCHEMA.names
CARRIED_COLUMNS = ("age", "sex", "bmi", "label", "n_readers", "reader_agreement")
TRUTH_COLUMNS = ("image", "patient_ref", "t_score", "true_label")
_NATIVE_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_DICOM_FLOAT_TAGS = {
    "rescale_slope": "RescaleSlope", "rescale_intercept": "RescaleIntercept",
    "window_center": "WindowCenter", "window_width": "WindowWidth",
}
_WORKERS = 4
_MAX_DETAIL = 160


def image_map_path(layout: Layout) -> Path:
    """work/pseudonymise/image_map.parquet: export file name -> image id (local only)."""
    return layout.root / "work" / "pseudonymise" / "image_map.parquet"


def ground_truth_path(layout: Layout) -> Path:
    """data/oracle/ground_truth.parquet: image_id, t_score, true_label of synthetic exports."""
    return layout.root / "data" / "oracle" / "ground_truth.parquet"


class DecodeError(Exception):
    """An image's pixels cannot be used; ``reason`` is a quarantine reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class Decoded:
    """Stored pixel values of one image and its non-identifying display attributes."""

    pixels: np.ndarray
    attributes: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- decoding


def decode_image(path: Path, image_format: str, sha256: str) -> Decoded:
    """Read an export image once, check it is the file ingest saw, and decode its pixels.

    Args:
        path: the image file.
        image_format: ``dicom`` or ``png``.
        sha256: the digest ingest recorded for the file.

    Returns:
        The stored pixel values (uint16, rows x columns) and the display attributes.

    Raises:
        DecodeError: when the file is missing, changed since ingest, or cannot be decoded.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        detail = f"file cannot be read ({type(error).__name__})"
        raise DecodeError("missing_image", detail) from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DecodeError("changed_since_ingest", "file content differs from its ingest sha256")
    try:
        return decode_dicom(data) if image_format == "dicom" else decode_png(data)
    except DecodeError:
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure on untrusted bytes
        raise DecodeError("undecodable_pixels", _describe(error, path)) from None


def decode_dicom(data: bytes) -> Decoded:
    """Decode a DICOM radiograph's stored values, keeping only display attributes.

    Args:
        data: the file's bytes.

    Returns:
        Stored values as uint16 and modality, photometric, bits_stored, rescale and window
        attributes, rows and columns.

    Raises:
        DecodeError: when the values are signed and negative, or not a single 2-D frame.
    """
    dataset = pydicom.dcmread(io.BytesIO(data))
    pixels = _stored_values(dataset)
    if pixels.ndim != 2:
        raise DecodeError("unsupported_image", f"pixel array has {pixels.ndim} dimensions, not 2")
    if pixels.dtype.kind == "i":
        if pixels.size and pixels.min() < 0:
            raise DecodeError("unsupported_image", "signed pixel values below zero")
        pixels = pixels.astype(np.uint16)
    attributes: dict[str, Any] = {
        "modality": str(dataset.get("Modality", "")) or None,
        "photometric": str(dataset.PhotometricInterpretation),
        "bits_stored": int(dataset.get("BitsStored") or dataset.BitsAllocated),
        "rows": int(pixels.shape[0]), "columns": int(pixels.shape[1]),
    }
    for column, keyword in _DICOM_FLOAT_TAGS.items():
        attributes[column] = _first_float(dataset.get(keyword))
    return Decoded(pixels.astype(np.uint16, copy=False), attributes)


def _stored_values(dataset: pydicom.Dataset) -> np.ndarray:
    """Stored values; uncompressed unsigned 16-bit data is viewed in place, not converted."""
    transfer_syntax = dataset.file_meta.get("TransferSyntaxUID")
    bits_stored = int(dataset.get("BitsStored") or 16)
    fast = (
        transfer_syntax in _NATIVE_LITTLE_ENDIAN and dataset.get("BitsAllocated") == 16
        and dataset.get("PixelRepresentation", 0) == 0 and dataset.get("SamplesPerPixel", 1) == 1
        and int(dataset.get("NumberOfFrames", 1) or 1) == 1
        and int(dataset.get("HighBit", bits_stored - 1)) == bits_stored - 1
    )
    if not fast:
        pixels: np.ndarray = dataset.pixel_array
        return pixels
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    buffer = dataset.PixelData
    if len(buffer) < rows * columns * 2:
        raise DecodeError("undecodable_pixels", "Pixel Data is shorter than rows x columns")
    pixels = np.frombuffer(buffer, dtype="<u2", count=rows * columns).reshape(rows, columns)
    if bits_stored < 16:
        pixels = pixels & np.uint16((1 << bits_stored) - 1)  # unused high bits are not pixel data
    return pixels


def decode_png(data: bytes) -> Decoded:
    """Decode a grayscale PNG (8 or 16 bits); PNG grayscale is bright-is-high (MONOCHROME2).

    Args:
        data: the file's bytes.

    Returns:
        Values as uint16; no modality, rescale or window attributes.

    Raises:
        DecodeError: when the PNG is not 8- or 16-bit grayscale.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        mode = image.mode
        pixels = np.asarray(image)
    if mode not in ("L", "I;16", "I;16B", "I;16L"):
        raise DecodeError("unsupported_image", f"PNG mode {mode} is not 8- or 16-bit grayscale")
    # Limitation: a PNG carries no modality, rescale or window, nor how many of its 16 bits are
    # significant; those attributes stay null and bits_stored is the PNG bit depth.
    attributes: dict[str, Any] = {
        "modality": None, "photometric": "MONOCHROME2", "bits_stored": 8 if mode == "L" else 16,
        "rows": int(pixels.shape[0]), "columns": int(pixels.shape[1]),
    }
    attributes |= dict.fromkeys(DISPLAY_FLOATS)
    return Decoded(pixels.astype(np.uint16, copy=False), attributes)


def _first_float(value: Any) -> float | None:
    """A DICOM decimal attribute as a float; the first value when it is multi-valued."""
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return _first_float(value[0]) if len(value) else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _describe(error: Exception, path: Path) -> str:
    """A decoder's message without the file's path (the pushed quarantine must not link the
    export file name to its image id)."""
    message = str(error).replace(str(path), "<file>").replace(path.name, "<file>")
    return f"pixels cannot be decoded ({type(error).__name__}: {message})"[:_MAX_DETAIL]


# ---------------------------------------------------------------------------------- stage


@task(name="pseudonymise", cache_policy=NO_CACHE)
def pseudonymise(layout: Layout, params: dict[str, Any]) -> StageSummary:
    """Pseudonymise the ingested records (see the module docstring).

    Args:
        layout: the project's paths.
        params: params.yaml (``export.path``, ``preprocess.shard_size``).

    Returns:
        The stage summary, also written to reports/pseudonymise.json.

    Raises:
        ConfigError: when ingest has not run, or the vault key file or storage is unusable.
        ExportError: when the export directory is gone.
        VaultError: when the identity vault refuses a request or an entry fails to decrypt.
    """
    started = time.perf_counter()

    # 1. The ingested records (identifiable, local) and the export's images.
    records = read_ingested(layout)
    images_dir = export_directory(layout, params) / "images"

    # 2. Pseudonyms and image ids from the identity vault: created once, then reused.
    vault = IdentityVault.open(layout.root)
    patients, images = vault.resolve(_identities(records), records["sha256"])
    records = records.assign(
        patient_id=records["patient_ref"].map(patients.ids),
        image_id=records["sha256"].map(images.ids),
    ).sort_values("image_id", ignore_index=True)
    vault_seconds = time.perf_counter() - started

    # 3. Pixels decoded once and written to shards; failures go to quarantine.
    quarantine = Quarantine(STAGE)
    shard_size = int(params.get("preprocess", {}).get("shard_size", 256))
    rows = write_shards(records, images_dir, layout.raw_pixel_dir, shard_size, quarantine)

    # 4. Outputs: records without identity, quarantine, local image map, summary.
    write_records(rows, layout.pseudonymised_records)
    quarantine.write(layout.quarantine(STAGE))
    write_image_map(records, image_map_path(layout))
    summary = StageSummary(
        stage=STAGE, records_in=len(records), accepted=len(rows),
        quarantined=quarantine.by_reason(), unit="image", outputs=_outputs(layout),
        extra={
            "patients": len(patients.ids), "new_patients": patients.created,
            "new_images": images.created,
            "shards": len(list(layout.raw_pixel_dir.glob("shard-*.npz"))),
            "seconds": {"vault": round(vault_seconds, 3),
                        "total": round(time.perf_counter() - started, 3)},
        },
    )
    summary.write(layout.summary(STAGE))
    logger.info(
        "pseudonymise: %d images in, %d accepted, %d quarantined %s; %d patients (%d new) "
        "(%.1f s)", summary.records_in, summary.accepted, summary.quarantined_total,
        summary.quarantined, summary.extra["patients"], patients.created,
        summary.extra["seconds"]["total"],
    )
    logger.info("pseudonymise: wrote %s", ", ".join(summary.outputs.values()))
    return summary


def read_ingested(layout: Layout) -> pd.DataFrame:
    """work/ingest/records.parquet.

    Raises:
        ConfigError: when the ingest stage has not run.
    """
    if not layout.ingested_records.exists():
        raise ConfigError(f"{layout.ingested_records} not found: run the ingest stage first")
    return pd.read_parquet(layout.ingested_records)


def _identities(records: pd.DataFrame) -> list[PatientIdentity]:
    """One identity per patient, with the birth date of the patient's first image (in file name
    order) whose DICOM header has one."""
    without_birth_date = records["birth_date"].fillna("").eq("")
    patients = records.iloc[without_birth_date.argsort(kind="stable")]
    patients = patients.drop_duplicates("patient_ref")
    return [
        PatientIdentity(row.patient_ref, row.first_name, row.last_name, row.birth_date or "")
        for row in patients.itertuples(index=False)
    ]


def write_shards(
    records: pd.DataFrame, images_dir: Path, pixel_dir: Path, shard_size: int,
    quarantine: Quarantine,
) -> list[dict[str, Any]]:
    """Decode every image and write its stored values into shards keyed by image id.

    Images are decoded a shard at a time by a few threads (file reads and hashing overlap),
    so at most one shard of pixels is held in memory.

    Args:
        records: ingested records with their ``image_id`` and ``patient_id``, in output order.
        images_dir: the export's images/.
        pixel_dir: data/pseudonymised/pixels (old shards are removed).
        shard_size: images per shard.
        quarantine: where images that cannot be decoded go.

    Returns:
        One pseudonymised record per image written, with its shard.
    """
    rows: list[dict[str, Any]] = []
    items = records.to_dict("records")
    chunks = [items[start:start + shard_size] for start in range(0, len(items), shard_size)]
    with ShardWriter(pixel_dir, shard_size) as writer, \
            ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        for chunk in track(chunks, "decoding radiographs"):
            futures = [pool.submit(decode_image, images_dir / item["image"], item["format"],
                                   item["sha256"]) for item in chunk]
            for item, future in zip(chunk, futures, strict=True):
                try:
                    decoded = future.result()
                except DecodeError as error:
                    quarantine.add("work/ingest/records.parquet", error.reason, error.detail,
                                   record_id=item["image_id"])
                    continue
                shard = writer.add(item["image_id"], decoded.pixels)
                rows.append(_pseudonymised_row(item, decoded, shard))
    return rows


def _pseudonymised_row(item: dict[str, Any], decoded: Decoded, shard: str) -> dict[str, Any]:
    row = {"image_id": item["image_id"], "patient_id": item["patient_id"]}
    row |= {column: item[column] for column in CARRIED_COLUMNS}
    return row | decoded.attributes | {"shard": shard}


def write_records(rows: list[dict[str, Any]], path: Path) -> None:
    """Write data/pseudonymised/records.parquet with exactly the contract's columns and types."""
    frame = pd.DataFrame(rows, columns=RECORD_COLUMNS)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(frame, schema=RECORD_SCHEMA, preserve_index=False), path)


def write_image_map(records: pd.DataFrame, path: Path) -> None:
    """Write the local-only map from export file name to image id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records[["image", "image_id"]].sort_values("image").to_parquet(path, index=False)


def _outputs(layout: Layout) -> dict[str, str]:
    paths = {
        "records": layout.pseudonymised_records, "pixels": layout.raw_pixel_dir,
        "quarantine": layout.quarantine(STAGE), "image_map": image_map_path(layout),
    }
    return {name: path.relative_to(layout.root).as_posix() for name, path in paths.items()}


# ---------------------------------------------------------------------------------- oracle


def translate_ground_truth(layout: Layout, truth_csv: Path) -> Path:
    """Translate a synthetic export's ground truth to image ids, for the oracle AUC.

    Only images that were pseudonymised are kept; the patient reference is dropped.

    Args:
        layout: the project's paths (reads the image map and the pseudonymised records).
        truth_csv: the ground truth CSV (image, patient_ref, t_score, true_label), kept outside
            the export.

    Returns:
        The path of data/oracle/ground_truth.parquet (image_id, t_score, true_label).

    Raises:
        ExportError: when the ground truth file is missing or its columns differ.
        ConfigError: when the pseudonymise stage has not run.
    """
    if not truth_csv.is_file():
        raise ExportError(str(truth_csv), None, "ground truth file not found")
    truth = pd.read_csv(truth_csv, dtype={"image": str, "patient_ref": str, "true_label": str})
    missing = [column for column in TRUTH_COLUMNS if column not in truth.columns]
    if missing:
        raise ExportError(str(truth_csv), 1, f"missing columns: {', '.join(missing)}")
    if not image_map_path(layout).exists() or not layout.pseudonymised_records.exists():
        raise ConfigError("no pseudonymised records yet: run the pseudonymise stage first")

    image_map = pd.read_parquet(image_map_path(layout))
    kept = pd.read_parquet(layout.pseudonymised_records, columns=["image_id"])
    oracle = (
        truth.merge(image_map, on="image", how="inner")
        .loc[lambda frame: frame["image_id"].isin(kept["image_id"])]
        [["image_id", "t_score", "true_label"]]
        .astype({"t_score": "float64"})
        .sort_values("image_id", ignore_index=True)
    )
    path = ground_truth_path(layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    oracle.to_parquet(path, index=False)
    logger.info("ground truth of %d pseudonymised images written to %s", len(oracle), path)
    return path
