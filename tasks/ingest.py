"""Ingest: read a hospital export, check every file, and keep labels from accredited readers only.

Controls 4.28 (use reliable sources to label data) and 4.9 (control all data used by the ML
model). The export is taken as a whole: a missing CSV or a CSV whose columns differ from the
contract stops the stage with one ``ExportError`` naming the file and the columns. Everything
else is checked record by record; a bad record goes to quarantine with a reason code and a
detail naming its file and row, and the good records continue.

Reads    the export directory ``export.path``: patients.csv, annotations.csv, images/
Writes   work/ingest/records.parquet   one row per accepted image, identifiable (local only)
         work/ingest/manifest.csv      file, bytes, sha256 of every file of the export
         work/ingest/pixels/shard-*    model inputs (float16, preprocess.size squared) of the
                                       accepted images
         data/quarantine/ingest.csv    every rejected record and annotation, with its reason
         reports/ingest.json           counts (unit ``record``), annotation and reader figures

Each image file is read once, by one worker process per core: its bytes give the sha256, the
header check, the decoded stored pixel values, their statistics (``osteo.radiograph``) and the
model input (``tasks.preprocess.to_model_input``, at ``preprocess.size``). The model inputs of
the accepted images go to local shards of ``preprocess.shard_size`` images, in file name order
under neutral member names, which the pseudonymise and preprocess stages publish as they are;
no later stage reads the export's images again, and the full-resolution pixels are never
written. The records carry the header's display attributes, the image statistics, the sha256 of
the model input (``content_key``) or, for an image of which no model input can be made, why
(``input_reason``, ``input_detail``), nothing else of the header.

What counts as a record: every file of images/, every image name that annotations.csv mentions
but images/ lacks, and every patients.csv row no image refers to (including duplicate and
malformed rows). So ``records_in == accepted + quarantined`` holds. Annotations are counted
apart in ``extra["annotations"]`` (``in == used + quarantined``); a missing image named by
several annotation rows is one record but one quarantine row per annotation row.

Labels (control 4.28): an annotation counts only when its reader is in
``readers.accredited``, its label is ``osteoporosis`` or ``normal``, its ``annotated_at`` is
ISO 8601 and its patient_ref names a patient of patients.csv. When a reader annotated an image
twice, the more recent annotation stands. The image's label is the majority of its readers; a
tie goes to ``osteoporosis``: a missed osteoporosis delays treatment, a false alarm costs a
bone density scan, so recall comes first. ``ingest.min_readers`` sets how many accredited
readers an image needs.

Reason codes of images: ``not_an_image``, ``duplicate_file``, ``unreadable_dicom``,
``dicom_without_pixels``, ``truncated_image``, ``corrupt_image``, ``unsupported_image``,
``undecodable_pixels``, ``no_annotation``, ``no_accredited_annotation``, ``no_valid_annotation``,
``conflicting_patient_ref``, ``too_few_readers``, and the patient's own reason
(``unknown_sex``, ``age_not_a_number``, ``bmi_not_a_number``). Of patient rows:
``patient_without_image``, ``duplicate_patient_ref``, ``missing_patient_ref``,
``malformed_row`` or the reasons above. Of annotations: ``annotation_without_image``,
``unaccredited_reader``, ``unknown_label``, ``unparseable_annotated_at``, ``unknown_patient``,
``superseded_annotation``, ``image_rejected``, ``malformed_row``.

Privacy: names, patient references and birth dates stay in ``work/``. Quarantine details and log
lines name export files, rows and columns only, never a cell value.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import multiprocessing
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
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
from pydicom.pixels import get_decoder

from osteo.config import ConfigError
from osteo.deid import BurnedInAnnotationError, check_burned_in_values
from osteo.layout import Layout
from osteo.parallel import SharedArrays, SharedSpec, attach, attached, ordered_map
from osteo.progress import track
from osteo.quarantine import Quarantine
from osteo.radiograph import (
    ATTRIBUTE_COLUMNS,
    PNG_MODES,
    PNG_SIGNATURE,
    STAT_COLUMNS,
    Decoded,
    DecodeError,
    DicomHeader,
    PixelEncoding,
    decode_dicom,
    decode_png,
    header_value,
    image_statistics,
    read_dicom,
)
from osteo.shards import ShardWriter
from osteo.summary import StageSummary
from tasks.preprocess import ImageRejected, setting, single_threaded, to_model_input

logger = logging.getLogger(__name__)

STAGE = "ingest"
PATIENTS_CSV = "patients.csv"
ANNOTATIONS_CSV = "annotations.csv"
IMAGES_DIR = "images"
PATIENT_COLUMNS = ("patient_ref", "first_name", "last_name", "age", "sex", "bmi")
ANNOTATION_COLUMNS = ("image", "patient_ref", "reader_id", "label", "annotated_at")
LABELS = ("osteoporosis", "normal")
SEXES = ("F", "M")
TIE_LABEL = "osteoporosis"
IMAGE_FORMATS = {".dcm": "dicom", ".png": "png"}
INTEGER_COLUMNS = {"bits_stored", "rows", "columns", "height", "width", "min_side",
                   "stored_min", "stored_max", "bits_used"}
INPUT_COLUMNS = ("content_key", "input_reason", "input_detail")
PIXEL_COLUMNS = (*ATTRIBUTE_COLUMNS, *STAT_COLUMNS, *INPUT_COLUMNS)
STRING_COLUMNS = {"modality", "photometric", *INPUT_COLUMNS}
RECORD_SCHEMA = pa.schema([
    ("image", pa.string()), ("sha256", pa.string()), ("format", pa.string()),
    ("patient_ref", pa.string()), ("first_name", pa.string()), ("last_name", pa.string()),
    ("age", pa.float64()), ("sex", pa.string()), ("bmi", pa.float64()), ("label", pa.string()),
    ("n_readers", pa.int64()), ("reader_agreement", pa.float64()), ("birth_date", pa.string()),
    *[(column, pa.string() if column in STRING_COLUMNS
       else pa.int64() if column in INTEGER_COLUMNS else pa.float64())
      for column in PIXEL_COLUMNS],
    ("pixel_shard", pa.string()), ("pixel_member", pa.string()),
])
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
BATCH_IMAGES = 16  # images per unit of work of the worker processes
# One worker process per core this process may run on (a container's CPU set, not the host's).
WORKERS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
IN_FLIGHT = 2 * WORKERS  # batches submitted to the workers and not yet joined
_MAX_DETAIL = 160
_MAX_ROWS_IN_DETAIL = 10


class ExportError(Exception):
    """The export as a whole is unusable: a missing file or CSV columns not as the contract says.

    Args:
        file: the export file concerned.
        row: the row concerned (the header is row 1), or None for the whole file.
        message: what is wrong, naming columns, never cell values.
    """

    def __init__(self, file: str, row: int | None, message: str) -> None:
        super().__init__(file, row, message)
        self.file, self.row, self.message = file, row, message

    def __str__(self) -> str:
        where = self.file if self.row is None else f"{self.file} row {self.row}"
        return f"{where}: {self.message}"


# ---------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class CsvTable:
    """Rows of one export CSV: ``(row number, values by column)``, and malformed row numbers."""

    name: str
    rows: list[tuple[int, dict[str, str]]]
    malformed: list[int]


@dataclass(frozen=True)
class ImageFile:
    """One file of images/ after its checks; ``reason`` is empty when it is usable.

    ``pixels`` (display attributes and image statistics, ``PIXEL_COLUMNS``) is filled for
    usable images only.
    """

    name: str
    size: int
    sha256: str
    format: str = ""
    birth_date: str = ""
    reason: str = ""
    detail: str = ""
    pixels: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        # Limitation: the quarantine names an image by its export file name. Exports whose file
        # names carry patient names would carry them into data/quarantine/ingest.csv; the
        # export contract asks for neutral names (IMG000017.dcm) and nothing here checks it.
        return f"{IMAGES_DIR}/{self.name}"


@dataclass(frozen=True)
class Patient:
    """One patients.csv row, parsed; ``reason`` is empty when its values are usable."""

    row: int
    values: dict[str, str]
    age: float | None
    bmi: float | None
    sex: str
    reason: str = ""
    detail: str = ""


@dataclass(frozen=True)
class Annotation:
    """One annotations.csv row, parsed; ``reason`` is empty when it may be used."""

    row: int
    image: str
    patient_ref: str
    reader_id: str
    label: str
    annotated_at: datetime | None
    reason: str = ""


@dataclass
class Ledger:
    """Quarantine rows, plus the count of rejected records and of rejected annotations."""

    quarantine: Quarantine = field(default_factory=lambda: Quarantine(STAGE))
    records: Counter[str] = field(default_factory=Counter)
    annotations: Counter[str] = field(default_factory=Counter)

    def reject_record(self, source: str, reason: str, detail: str, row: int | None = None) -> None:
        """Quarantine one record (an image file or a patients.csv row)."""
        self.quarantine.add(source, reason, detail, row=row)
        self.records[reason] += 1

    def reject_annotation(self, row: int, reason: str, detail: str) -> None:
        """Quarantine one annotations.csv row."""
        self.quarantine.add(ANNOTATIONS_CSV, reason, detail, row=row)
        self.annotations[reason] += 1


def read_table(path: Path, columns: tuple[str, ...]) -> CsvTable:
    """Read an export CSV whose header must hold exactly ``columns`` (in any order).

    Args:
        path: the CSV file.
        columns: the contract's columns.

    Returns:
        The rows, each numbered as a spreadsheet shows it (header is row 1); blank lines are
        skipped and rows with the wrong number of fields are listed as malformed.

    Raises:
        ExportError: when the file is missing, not UTF-8, empty, or its columns differ.
    """
    if not path.is_file():
        raise ExportError(str(path), None, "file is missing from the export")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            records = list(csv.reader(handle))
    except UnicodeDecodeError:
        raise ExportError(str(path), None, "file is not UTF-8 text") from None
    except csv.Error as error:
        raise ExportError(str(path), None, f"file is not a readable CSV ({error})") from None
    if not records:
        raise ExportError(str(path), 1, "file is empty: the header row is missing")
    header = [name.strip() for name in records[0]]
    _check_columns(path, header, columns)

    rows, malformed = [], []
    for number, fields in enumerate(records[1:], start=2):
        if not any(value.strip() for value in fields):
            continue
        if len(fields) != len(header):
            malformed.append(number)
            continue
        values = {name: value.strip() for name, value in zip(header, fields, strict=True)}
        rows.append((number, values))
    return CsvTable(path.name, rows, malformed)


def _check_columns(path: Path, header: list[str], columns: tuple[str, ...]) -> None:
    missing = [name for name in columns if name not in header]
    extra = [name for name in header if name not in columns]
    repeated = sorted({name for name in header if header.count(name) > 1})
    problems = [
        f"{label}: {', '.join(names)}"
        for label, names in (("missing columns", missing), ("unexpected columns", extra),
                             ("repeated columns", repeated))
        if names
    ]
    if problems:
        raise ExportError(
            str(path), 1, "; ".join(problems) + f" (expected exactly: {', '.join(columns)})"
        )


# ---------------------------------------------------------------------------------- images


def image_files(images_dir: Path) -> tuple[list[Path], list[str]]:
    """The files under images/ in file name order, with their names relative to images/."""
    paths = sorted(path for path in images_dir.rglob("*") if path.is_file())
    return paths, [path.relative_to(images_dir).as_posix() for path in paths]


def inspect_image(path: Path, name: str, size: int) -> tuple[ImageFile, np.ndarray | None]:
    """Hash one file of images/, check that it is a usable radiograph and prepare its pixels.

    Args:
        path: the file.
        name: its name relative to images/.
        size: side of the square model input (``preprocess.size``).

    Returns:
        The file's size, sha256, format, DICOM birth date, display attributes and statistics,
        or the reason it is unusable; and its model input (``tasks.preprocess.to_model_input``),
        or None when the file is unusable or no model input can be made of it. The field
        ``content_key`` is the sha256 of the model input's bytes; when there is none,
        ``input_reason`` and ``input_detail`` say why, for the validate stage.
    """
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    image = ImageFile(name, len(data), digest, IMAGE_FORMATS.get(path.suffix.lower(), ""))
    if not image.format:
        detail = f"file type '{path.suffix or 'none'}' is not DICOM (.dcm) or PNG (.png)"
        return replace(image, reason="not_an_image", detail=detail), None
    if image.format == "png":
        check, dicom = _check_png(data), None
    else:
        check, dicom = _check_dicom(data)
    image = replace(image, birth_date=check.birth_date, reason=check.reason, detail=check.detail)
    if image.reason:
        return image, None
    try:
        decoded = decode_png(data) if dicom is None else decode_dicom(*dicom)
    except DecodeError as error:
        return replace(image, reason=error.reason, detail=error.detail), None
    except Exception as error:  # noqa: BLE001 - any decoder failure on untrusted bytes
        return replace(image, reason="undecodable_pixels", detail=_describe(error, path)), None
    fields = _pixel_fields(decoded) | dict.fromkeys(INPUT_COLUMNS)
    try:
        model_input = to_model_input(decoded.pixels, decoded.attributes, size, decoded.padding)
    except ImageRejected as rejection:
        fields |= {"input_reason": rejection.reason, "input_detail": rejection.detail}
        return replace(image, pixels=fields), None
    fields["content_key"] = hashlib.sha256(model_input.data).hexdigest()
    return replace(image, pixels=fields), model_input


def inspect_images(
    paths: list[Path], names: list[str], size: int, region: int,
) -> list[tuple[ImageFile, bool]]:
    """``inspect_image`` for a batch of files on one torch thread: a worker's unit of work.

    Runs in a worker process of ``worker_pool``: the model input of file ``i`` is written to
    slot ``(region, i)`` of the shared arrays the pool attached (``osteo.parallel``).

    Returns:
        Each file's ``ImageFile`` and whether its slot holds a model input.
    """
    inputs = attached()[region]
    inspected = []
    with single_threaded():
        for slot, (path, name) in enumerate(zip(paths, names, strict=True)):
            image, model_input = inspect_image(path, name, size)
            if model_input is not None:
                inputs[slot] = model_input
            inspected.append((image, model_input is not None))
    return inspected


def _pixel_fields(decoded: Decoded) -> dict[str, Any]:
    """Display attributes and statistics of a decoded image, as record fields."""
    encoding = PixelEncoding.of(decoded.attributes)
    return decoded.attributes | image_statistics(decoded.pixels, encoding, decoded.padding)


def _describe(error: Exception, path: Path) -> str:
    """A decoder's message without the file's path."""
    message = str(error).replace(str(path), "<file>")
    return f"pixels cannot be decoded ({type(error).__name__}: {message})"[:_MAX_DETAIL]


@dataclass(frozen=True)
class HeaderCheck:
    """Outcome of an image header check; ``reason`` is empty when the image is usable."""

    reason: str = ""
    detail: str = ""
    birth_date: str = ""


def _check_png(data: bytes) -> HeaderCheck:
    if not data.startswith(PNG_SIGNATURE):
        return HeaderCheck("corrupt_image", "not a PNG file (signature missing)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            mode = image.mode
            image.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        detail = f"PNG file is corrupt or truncated ({type(error).__name__})"
        return HeaderCheck("corrupt_image", detail)
    if mode not in PNG_MODES:
        detail = f"PNG mode {mode} is not 8- or 16-bit grayscale"
        return HeaderCheck("unsupported_image", detail)
    return HeaderCheck()


def _check_dicom(data: bytes) -> tuple[HeaderCheck, tuple[pydicom.Dataset, DicomHeader] | None]:
    """Parse a DICOM file and check it holds one usable grayscale radiograph.

    Returns:
        The check, and the parsed dataset with its header values when the file could be read.
    """
    try:
        dataset, header = read_dicom(data)
        birth_date = str(header_value(dataset, "PatientBirthDate") or "")
    except DecodeError as error:
        return HeaderCheck(error.reason, error.detail), None
    parsed = (dataset, header)
    if header.pixel_data_bytes is None:
        detail = "DICOM file has no Pixel Data element (header only, or truncated)"
        return HeaderCheck("dicom_without_pixels", detail, birth_date), parsed
    problem = _unsupported_dicom(header)
    if problem:
        return HeaderCheck("unsupported_image", problem, birth_date), parsed
    try:
        check_burned_in_values(header.burned_in_annotation, header.modality or "",
                               header.sop_class)
    except BurnedInAnnotationError as refused:
        detail = "the image may show text burned into its pixels (Burned In Annotation)"
        return HeaderCheck(refused.reason, detail, birth_date), parsed
    expected, found = _native_pixel_bytes(header), header.pixel_data_bytes
    if expected and found < expected:
        detail = (f"Pixel Data holds {found} bytes but {header.rows}x{header.columns} pixels "
                  f"of {header.bits_allocated} bits need {expected}")
        return HeaderCheck("truncated_image", detail, birth_date), parsed
    return HeaderCheck(birth_date=birth_date), parsed


def _unsupported_dicom(header: DicomHeader) -> str:
    """Why a DICOM image cannot be used as a single grayscale radiograph, or empty."""
    transfer_syntax = header.transfer_syntax
    checks = [
        (header.photometric not in MONOCHROME,
         f"photometric interpretation '{header.photometric}' is not MONOCHROME1 or MONOCHROME2"),
        (header.samples_per_pixel != 1, "more than one sample per pixel"),
        (header.bits_allocated not in (8, 16), "bits allocated is not 8 or 16"),
        (header.frames != 1, "multi-frame image"),
        (not header.rows or not header.columns, "rows or columns missing"),
        (header.modality_lut,
         "a Modality LUT Sequence maps the stored values; only a rescale slope and intercept "
         "are applied"),
        (transfer_syntax is not None and not _decodable(transfer_syntax),
         f"no pixel decoder available for transfer syntax {transfer_syntax}"),
    ]
    return next((message for failed, message in checks if failed), "")


def _decodable(transfer_syntax: pydicom.uid.UID) -> bool:
    try:
        return bool(get_decoder(transfer_syntax).is_available)
    except NotImplementedError:
        return False


def _native_pixel_bytes(header: DicomHeader) -> int:
    """Bytes the Pixel Data of an uncompressed image needs; 0 when encapsulated."""
    if header.transfer_syntax is not None and header.transfer_syntax.is_compressed:
        return 0
    return (header.rows or 0) * (header.columns or 0) * (header.bits_allocated or 0) // 8


def _mark_duplicate(image: ImageFile, first_of: dict[str, str]) -> ImageFile:
    """Mark a file whose content (sha256) an earlier file, by name order, already had."""
    original = first_of.setdefault(image.sha256, image.name)
    if original == image.name:
        return image
    detail = f"same content (sha256) as {IMAGES_DIR}/{original}, which is kept"
    return replace(image, reason="duplicate_file", detail=detail, pixels={})


def write_manifest(export_dir: Path, images: list[ImageFile], path: Path) -> int:
    """Write the sha256 manifest of every file of the export.

    Args:
        export_dir: the export directory.
        images: the checked image files (their hashes are reused).
        path: the manifest CSV to write (file, bytes, sha256).

    Returns:
        The number of files listed.
    """
    known = {f"{IMAGES_DIR}/{image.name}": (image.size, image.sha256) for image in images}
    rows = []
    for file in sorted(p for p in export_dir.rglob("*") if p.is_file()):
        name = file.relative_to(export_dir).as_posix()
        if name not in known:
            with file.open("rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
            known[name] = (file.stat().st_size, digest)
        rows.append({"file": name, "bytes": known[name][0], "sha256": known[name][1]})
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["file", "bytes", "sha256"]).to_csv(path, index=False)
    return len(rows)


# ---------------------------------------------------------------------------------- patients


def parse_patients(table: CsvTable, ledger: Ledger) -> tuple[dict[str, Patient], int]:
    """Index patients.csv by patient_ref; duplicate, malformed and ref-less rows are quarantined.

    Args:
        table: the rows of patients.csv.
        ledger: where rejected rows go.

    Returns:
        The first row of every patient_ref, parsed (possibly carrying a rejection reason), and
        the number of rows quarantined here.
    """
    for row in table.malformed:
        ledger.reject_record(PATIENTS_CSV, "malformed_row", _wrong_fields(len(PATIENT_COLUMNS)),
                             row)
    patients: dict[str, Patient] = {}
    for row, values in table.rows:
        ref = values["patient_ref"]
        if not ref:
            ledger.reject_record(PATIENTS_CSV, "missing_patient_ref", "patient_ref is empty", row)
        elif ref in patients:
            detail = f"patient_ref already defined at row {patients[ref].row}, which is kept"
            ledger.reject_record(PATIENTS_CSV, "duplicate_patient_ref", detail, row)
        else:
            patients[ref] = parse_patient(row, values)
    return patients, len(table.malformed) + len(table.rows) - len(patients)


def parse_patient(row: int, values: dict[str, str]) -> Patient:
    """Parse one patients.csv row; range checks belong to the validate stage.

    Args:
        row: its row number.
        values: its values by column.

    Returns:
        The patient, with ``reason`` set when sex is unknown or age or BMI is not a number.
    """
    sex = values["sex"].upper()
    age, bmi = _number(values["age"]), _number(values["bmi"])
    patient = Patient(row, values, age, bmi, sex)
    if sex not in SEXES:
        detail = f"sex must be one of {', '.join(SEXES)}"
        return replace(patient, reason="unknown_sex", detail=detail)
    if age is None:
        return replace(patient, reason="age_not_a_number", detail="age is not a number")
    if bmi is None:
        return replace(patient, reason="bmi_not_a_number", detail="bmi is not a number")
    return patient


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _wrong_fields(expected: int) -> str:
    return f"row does not have {expected} fields (check quoting of commas and quotes)"


# ---------------------------------------------------------------------------------- annotations


def parse_annotations(
    table: CsvTable,
    image_names: set[str],
    patients: dict[str, Patient],
    accredited: set[str],
    ledger: Ledger,
) -> tuple[dict[str, list[Annotation]], dict[str, list[int]]]:
    """Parse annotations.csv and decide which annotations may be used.

    Args:
        table: the rows of annotations.csv.
        image_names: the files of images/.
        patients: patients.csv indexed by patient_ref.
        accredited: reader ids of ``readers.accredited``.
        ledger: where malformed rows and rows naming a missing image go.

    Returns:
        The annotations of every image of images/ (each with its rejection reason or none),
        and the rows of every image name that images/ lacks.
    """
    for row in table.malformed:
        ledger.reject_annotation(row, "malformed_row", _wrong_fields(len(ANNOTATION_COLUMNS)))
    by_image: dict[str, list[Annotation]] = defaultdict(list)
    orphans: dict[str, list[int]] = defaultdict(list)
    for row, values in table.rows:
        if values["image"] not in image_names:
            orphans[values["image"]].append(row)
            continue
        by_image[values["image"]].append(parse_annotation(row, values, patients, accredited))
    return dict(by_image), dict(orphans)


def parse_annotation(
    row: int, values: dict[str, str], patients: dict[str, Patient], accredited: set[str]
) -> Annotation:
    """Parse one annotations.csv row and give the first reason it may not be used, if any.

    Args:
        row: its row number.
        values: its values by column.
        patients: patients.csv indexed by patient_ref.
        accredited: reader ids of ``readers.accredited``.

    Returns:
        The annotation; ``reason`` is empty when it may be used.
    """
    label = values["label"].lower()
    annotated_at = _timestamp(values["annotated_at"])
    checks = [
        (values["reader_id"] not in accredited, "unaccredited_reader"),
        (label not in LABELS, "unknown_label"),
        (annotated_at is None, "unparseable_annotated_at"),
        (values["patient_ref"] not in patients, "unknown_patient"),
    ]
    reason = next((code for failed, code in checks if failed), "")
    return Annotation(row, values["image"], values["patient_ref"], values["reader_id"], label,
                      annotated_at, reason)


ANNOTATION_DETAILS = {
    "unaccredited_reader": "reader_id is not in readers.accredited",
    "unknown_label": f"label is not one of {', '.join(LABELS)}",
    "unparseable_annotated_at": "annotated_at is not an ISO 8601 date or time",
    "unknown_patient": "patient_ref does not match any row of patients.csv",
}


def _timestamp(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# ---------------------------------------------------------------------------------- join


@dataclass
class Verdict:
    """What the join decided for one image: a record, or a reason to quarantine it."""

    record: dict[str, Any] | None = None
    reason: str = ""
    detail: str = ""
    used: list[Annotation] = field(default_factory=list)
    superseded: list[Annotation] = field(default_factory=list)


def consensus(labels: Iterable[str]) -> tuple[str, float, bool]:
    """The majority label of an image's readers; a tie goes to ``osteoporosis``.

    Args:
        labels: one label per reader (``osteoporosis`` or ``normal``).

    Returns:
        The consensus label, the share of readers who gave it, and whether it was a tie.
    """
    counts = Counter(labels)
    top = max(counts.values())
    leaders = [label for label in LABELS if counts[label] == top]
    label = TIE_LABEL if len(leaders) > 1 else leaders[0]
    return label, counts[label] / sum(counts.values()), len(leaders) > 1


def judge_image(
    image: ImageFile, annotations: list[Annotation], patients: dict[str, Patient],
    min_readers: int,
) -> Verdict:
    """Join one image with its annotations and patient, or say why it cannot be used.

    Args:
        image: the checked image file.
        annotations: every annotations.csv row naming it.
        patients: patients.csv indexed by patient_ref.
        min_readers: accredited readers the image needs.

    Returns:
        The verdict: a record for work/ingest/records.parquet, or a reason and detail.
    """
    if image.reason:
        return Verdict(reason=image.reason, detail=image.detail)
    rows = _rows([a.row for a in annotations])
    valid = [a for a in annotations if not a.reason]
    refusal = _refusal(annotations, valid, rows)
    if refusal:
        return Verdict(reason=refusal[0], detail=refusal[1])
    patient = patients[valid[0].patient_ref]
    if patient.reason:
        detail = f"{PATIENTS_CSV} row {patient.row}: {patient.detail}"
        return Verdict(reason=patient.reason, detail=detail)

    latest, superseded = _latest_per_reader(valid)
    if len(latest) < min_readers:
        detail = f"{len(latest)} accredited reader(s), ingest.min_readers is {min_readers}"
        return Verdict(reason="too_few_readers", detail=detail, superseded=superseded)
    label, agreement, _ = consensus(a.label for a in latest)
    record = {
        "image": image.name, "sha256": image.sha256, "format": image.format,
        "patient_ref": valid[0].patient_ref, "first_name": patient.values["first_name"],
        "last_name": patient.values["last_name"], "age": patient.age, "sex": patient.sex,
        "bmi": patient.bmi, "label": label, "n_readers": len(latest),
        "reader_agreement": agreement, "birth_date": image.birth_date,
        **image.pixels,
    }
    return Verdict(record=record, used=latest, superseded=superseded)


def _refusal(
    annotations: list[Annotation], valid: list[Annotation], rows: str
) -> tuple[str, str] | None:
    if not annotations:
        return "no_annotation", f"no row of {ANNOTATIONS_CSV} names this image"
    if all(a.reason == "unaccredited_reader" for a in annotations):
        return "no_accredited_annotation", f"{ANNOTATIONS_CSV} {rows}: no accredited reader"
    if not valid:
        return "no_valid_annotation", (
            f"{ANNOTATIONS_CSV} {rows}: every annotation was rejected (see those rows)"
        )
    # Limitation: the DICOM PatientID is not compared with the annotations' patient_ref, because
    # exports may use another identifier in headers; a mislinked image is caught only when its
    # annotations disagree among themselves.
    if len({a.patient_ref for a in valid}) > 1:
        return "conflicting_patient_ref", (
            f"{ANNOTATIONS_CSV} {rows}: annotations name different patients"
        )
    return None


def _latest_per_reader(valid: list[Annotation]) -> tuple[list[Annotation], list[Annotation]]:
    latest: dict[str, Annotation] = {}
    superseded: list[Annotation] = []
    for annotation in sorted(valid, key=lambda a: (a.annotated_at, a.row)):
        if annotation.reader_id in latest:
            superseded.append(latest[annotation.reader_id])
        latest[annotation.reader_id] = annotation
    return list(latest.values()), superseded


def _rows(rows: list[int]) -> str:
    shown = ", ".join(str(row) for row in rows[:_MAX_ROWS_IN_DETAIL])
    more = f" and {len(rows) - _MAX_ROWS_IN_DETAIL} more" if len(rows) > _MAX_ROWS_IN_DETAIL else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


def settle_annotations(
    annotations: list[Annotation], verdict: Verdict, ledger: Ledger
) -> int:
    """Quarantine every annotation of an image that was not used for its label.

    Args:
        annotations: the image's annotations.
        verdict: what the join decided for the image.
        ledger: where rejected annotations go.

    Returns:
        The number of annotations used.
    """
    used = {a.row for a in verdict.used}
    superseded = {a.row for a in verdict.superseded}
    for annotation in annotations:
        if annotation.row in used:
            continue
        if annotation.reason:
            ledger.reject_annotation(annotation.row, annotation.reason,
                                     ANNOTATION_DETAILS[annotation.reason])
        elif annotation.row in superseded:
            ledger.reject_annotation(annotation.row, "superseded_annotation",
                                     "the same reader annotated this image again later")
        else:
            detail = f"its image was quarantined ({verdict.reason})"
            ledger.reject_annotation(annotation.row, "image_rejected", detail)
    return len(used)


# ---------------------------------------------------------------------------------- stage


@task(name="ingest", cache_policy=NO_CACHE)
def ingest(layout: Layout, params: dict[str, Any]) -> StageSummary:
    """Ingest the export named by ``export.path`` (see the module docstring).

    Args:
        layout: the project's paths.
        params: params.yaml (``export.path``, ``readers.accredited``, ``ingest.min_readers``).

    Returns:
        The stage summary, also written to reports/ingest.json.

    Raises:
        ExportError: when the export as a whole is unusable.
        ConfigError: when the system has too little shared memory for the worker processes.
    """
    started = time.perf_counter()

    # 1. The export as a whole: directory, CSV files and their columns.
    export_dir = export_directory(layout, params)
    patients_table = read_table(export_dir / PATIENTS_CSV, PATIENT_COLUMNS)
    annotations_table = read_table(export_dir / ANNOTATIONS_CSV, ANNOTATION_COLUMNS)

    # 2. Patients and annotations parsed; rows that can never join are quarantined.
    paths, names = image_files(export_dir / IMAGES_DIR)
    ledger = Ledger()
    patients, unusable_rows = parse_patients(patients_table, ledger)
    accredited = {str(reader) for reader in params["readers"]["accredited"]}
    by_image, orphans = parse_annotations(annotations_table, set(names), patients, accredited,
                                          ledger)
    _quarantine_orphan_annotations(orphans, ledger)

    # 3. Every image read once (sha256, header check, statistics and model input) and joined
    #    with its annotations and patient; the accepted images' model inputs go to local shards.
    joining = Joining(by_image, patients, int(params.get("ingest", {}).get("min_readers", 1)),
                      ledger)
    size, shard_size = setting(params, "size"), setting(params, "shard_size")
    images = ingest_images(paths, names, joining, layout.ingest_pixel_dir, shard_size, size)
    records, used, figures = joining.records, joining.used, joining.readers.figures()
    files_listed = write_manifest(export_dir, images, layout.manifest)

    # 4. Patient rows no image refers to.
    linked = {a.patient_ref for annotations in by_image.values() for a in annotations}
    orphan_patients = _quarantine_orphan_patients(patients, linked, ledger)

    # 5. Outputs and the account of what came in and went out.
    write_records(records, layout.ingested_records)
    ledger.quarantine.rejections.sort(key=lambda r: (r.source, r.row or 0))
    ledger.quarantine.write(layout.quarantine(STAGE))
    summary = StageSummary(
        stage=STAGE, unit="record",
        records_in=len(images) + len(orphans) + unusable_rows + orphan_patients,
        accepted=len(records), quarantined=dict(sorted(ledger.records.items())),
        outputs=_outputs(layout),
        extra={
            "images": len(images), "export_files": files_listed,
            "annotations": _annotation_counts(annotations_table, used, ledger),
            "readers": figures, "seconds": round(time.perf_counter() - started, 3),
        },
    )
    summary.write(layout.summary(STAGE))
    _log_summary(summary)
    return summary


def export_directory(layout: Layout, params: dict[str, Any]) -> Path:
    """The export directory of ``export.path``, relative to the project directory.

    Raises:
        ExportError: when the directory or its images/ directory is missing.
    """
    configured = Path(str(params["export"]["path"]))
    export_dir = configured if configured.is_absolute() else layout.root / configured
    if not export_dir.is_dir():
        raise ExportError(str(export_dir), None, "export directory not found (export.path)")
    if not (export_dir / IMAGES_DIR).is_dir():
        raise ExportError(str(export_dir / IMAGES_DIR), None, "images directory is missing")
    return export_dir


def _quarantine_orphan_annotations(orphans: dict[str, list[int]], ledger: Ledger) -> None:
    """One record per missing image name, one quarantine row per annotation row naming it."""
    for rows in orphans.values():
        detail = f"the image it names is not in {IMAGES_DIR}/"
        for row in rows:
            ledger.reject_annotation(row, "annotation_without_image", detail)
        ledger.records["annotation_without_image"] += 1


def _quarantine_orphan_patients(
    patients: dict[str, Patient], linked: set[str], ledger: Ledger
) -> int:
    orphans = [patient for ref, patient in patients.items() if ref not in linked]
    for patient in orphans:
        if patient.reason:
            ledger.reject_record(PATIENTS_CSV, patient.reason, patient.detail, patient.row)
        else:
            detail = f"no image of {IMAGES_DIR}/ is annotated for this patient"
            ledger.reject_record(PATIENTS_CSV, "patient_without_image", detail, patient.row)
    return len(orphans)


def ingest_images(
    paths: list[Path], names: list[str], joining: Joining, pixel_dir: Path, shard_size: int,
    size: int,
) -> list[ImageFile]:
    """Read, check, decode, prepare and join every image file, keeping the accepted model inputs.

    Worker processes (``worker_pool``) inspect the files in batches of ``BATCH_IMAGES``,
    ``IN_FLIGHT`` batches at a time, each writing its model inputs to its own region of shared
    arrays. The results are joined here in file name order, so the first of several files with
    the same content is the one kept. The model input of each accepted image goes to the local
    shards of ``pixel_dir`` under a neutral member name (its rank among the accepted images), so
    that the shards can be published as they are by the pseudonymise stage; the record names
    its shard and member.

    Args:
        paths: the files of images/, in file name order.
        names: their names relative to images/.
        joining: the annotations and patients to join with, and where the outcome goes.
        pixel_dir: work/ingest/pixels (old shards are removed).
        shard_size: images per shard.
        size: side of the square model input.

    Returns:
        One entry per file, with its sha256 for the manifest.
    """
    files: list[ImageFile] = []
    first_of: dict[str, str] = {}
    batch_paths, batch_names, regions = batch_plan(paths, names)
    with (_shared_inputs(size) as inputs,
          ShardWriter(pixel_dir, shard_size) as writer, worker_pool(inputs.spec) as pool):
        batches = ordered_map(pool, inspect_images, batch_paths, batch_names,
                              [size] * len(regions), regions, ahead=IN_FLIGHT)
        inspected = ((region, slot, image, has_input)
                     for region, batch in zip(regions, _reported_crashes(batches, batch_names),
                                             strict=True)
                     for slot, (image, has_input) in enumerate(batch))
        for region, slot, image, has_input in track(inspected, "checking and preparing images",
                                                    total=len(paths)):
            image = _mark_duplicate(image, first_of)
            record = joining.join(image)
            if record is not None and has_input:
                member = f"{len(joining.records) - 1:06d}"
                record |= {"pixel_shard": writer.add(member, inputs.take(region, slot)),
                           "pixel_member": member}
            files.append(image)
    return files


def batch_plan(
    paths: list[Path], names: list[str],
) -> tuple[list[list[Path]], list[list[str]], list[int]]:
    """The workers' units of work: files and names in batches of ``BATCH_IMAGES``, and the
    shared-array region of each batch (``IN_FLIGHT`` batches are in flight at a time)."""
    starts = range(0, len(paths), BATCH_IMAGES)
    return ([paths[i:i + BATCH_IMAGES] for i in starts],
            [names[i:i + BATCH_IMAGES] for i in starts],
            [batch % IN_FLIGHT for batch in range(len(starts))])


def _shared_inputs(size: int) -> SharedArrays:
    """Shared memory for the model inputs of the batches in flight.

    Raises:
        ConfigError: when the system has too little shared memory free.
    """
    try:
        return SharedArrays(IN_FLIGHT, BATCH_IMAGES, (size, size), "float16")
    except OSError as error:
        raise ConfigError(
            f"ingest needs shared memory for its worker processes: {error}; give the "
            "container more (docker run --shm-size) or lower preprocess.size") from None


def _reported_crashes(
    batches: Iterable[list[tuple[ImageFile, bool]]], names: list[list[str]],
) -> Iterator[list[tuple[ImageFile, bool]]]:
    """The batches' results; a worker that died turns into an error naming the batch's files.

    A decoder that crashes on crafted bytes, or the kernel stopping a worker out of memory,
    ends its process without a Python exception to quarantine; nothing of the run is kept.
    """
    reached = 0  # the batch whose result is awaited
    try:
        for batch in batches:
            yield batch
            reached += 1
    except BrokenProcessPool:
        files = names[reached]
        raise ExportError(
            f"{IMAGES_DIR}/{files[0]} to {IMAGES_DIR}/{files[-1]}", None,
            "a worker process stopped while reading these files (a decoder crash or out of "
            "memory); find the file that causes it, remove it from the export and run again",
        ) from None


def worker_pool(inputs: SharedSpec) -> ProcessPoolExecutor:
    """``WORKERS`` processes for the per-image work, forked from this one where possible.

    Parsing DICOM headers is Python code that holds the interpreter lock, so threads cannot
    share it between the cores; processes can. Forked workers start in milliseconds with
    NumPy, pydicom and torch already imported (a spawned one would import torch again, about
    1.3 s). They only run ``inspect_images``, which opens no connection and logs nothing; they
    write the model inputs to the shared arrays of ``inputs`` and return plain values. A fork
    copies only the forking thread, so the parent's other threads (Prefect's API client, the
    shard writer) have no part in them.
    """
    # Limitation: where fork is unavailable (Windows), workers are spawned and each imports
    # torch again before its first image.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    return ProcessPoolExecutor(max_workers=WORKERS, mp_context=multiprocessing.get_context(method),
                               initializer=attach, initargs=(inputs,))


@dataclass
class ReaderAgreement:
    """Disagreement between accredited readers, over the images read by two or more of them."""

    images: int = 0
    disagreements: int = 0
    ties: int = 0
    per_reader: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def add(self, annotations: list[Annotation], label: str) -> None:
        """Count one accepted image's readers against its consensus label."""
        if len(annotations) < 2:
            return
        self.images += 1
        agreeing = sum(a.label == label for a in annotations)
        self.disagreements += agreeing < len(annotations)
        self.ties += agreeing * 2 == len(annotations)
        for annotation in annotations:
            self.per_reader[annotation.reader_id]["read"] += 1
            self.per_reader[annotation.reader_id]["agreed"] += annotation.label == label

    def figures(self) -> dict[str, Any]:
        """The figures for the stage summary."""
        return {
            "images_with_several_readers": self.images,
            "images_with_disagreement": self.disagreements,
            "disagreement_rate": round(self.disagreements / self.images, 4) if self.images else 0.0,
            "ties": self.ties,
            "tie_rule": f"majority of accredited readers; a tie goes to {TIE_LABEL}",
            "agreement_with_consensus": {
                reader: {"images": counts["read"],
                         "agreement": round(counts["agreed"] / counts["read"], 4)}
                for reader, counts in sorted(self.per_reader.items())
            },
        }


@dataclass
class Joining:
    """Joins each image, as it is read, with its annotations and patient (``judge_image``).

    Attributes:
        by_image: the annotations of every image of images/.
        patients: patients.csv indexed by patient_ref.
        min_readers: accredited readers an image needs.
        ledger: where rejected images and annotations go.
        records: the accepted images' records, in file name order.
        used: annotations used for a label so far.
        readers: agreement between the accredited readers of the accepted images.
    """

    by_image: dict[str, list[Annotation]]
    patients: dict[str, Patient]
    min_readers: int
    ledger: Ledger
    records: list[dict[str, Any]] = field(default_factory=list)
    used: int = 0
    readers: ReaderAgreement = field(default_factory=ReaderAgreement)

    def join(self, image: ImageFile) -> dict[str, Any] | None:
        """The image's record when it is accepted; otherwise it is quarantined and None."""
        annotations = self.by_image.get(image.name, [])
        verdict = judge_image(image, annotations, self.patients, self.min_readers)
        self.used += settle_annotations(annotations, verdict, self.ledger)
        if verdict.record is None:
            self.ledger.reject_record(image.source, verdict.reason, verdict.detail)
            return None
        self.records.append(verdict.record)
        self.readers.add(verdict.used, verdict.record["label"])
        return verdict.record


def _annotation_counts(table: CsvTable, used: int, ledger: Ledger) -> dict[str, Any]:
    return {
        "in": len(table.rows) + len(table.malformed),
        "used": used,
        "quarantined": dict(sorted(ledger.annotations.items())),
    }


def write_records(records: list[dict[str, Any]], path: Path) -> None:
    """Write work/ingest/records.parquet with the contract's columns and types."""
    frame = pd.DataFrame(records, columns=RECORD_SCHEMA.names)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(frame, schema=RECORD_SCHEMA, preserve_index=False), path)


def _outputs(layout: Layout) -> dict[str, str]:
    paths = {
        "records": layout.ingested_records, "manifest": layout.manifest,
        "pixels": layout.ingest_pixel_dir, "quarantine": layout.quarantine(STAGE),
    }
    return {name: path.relative_to(layout.root).as_posix() for name, path in paths.items()}


def _log_summary(summary: StageSummary) -> None:
    logger.info(
        "ingest: %d records in, %d images accepted, %d quarantined %s (%.1f s)",
        summary.records_in, summary.accepted, summary.quarantined_total,
        dict(sorted(summary.quarantined.items())), summary.extra["seconds"],
    )
    annotations, readers = summary.extra["annotations"], summary.extra["readers"]
    logger.info(
        "ingest: %d annotations, %d used; readers disagree on %d of %d images read twice or more",
        annotations["in"], annotations["used"], readers["images_with_disagreement"],
        readers["images_with_several_readers"],
    )
    logger.info("ingest: wrote %s", ", ".join(summary.outputs.values()))
