"""Tiny hand-made hospital exports for tests: a few patients with real DICOM and PNG files.

The default export has three patients whose names carry accents, quotes and a comma, five
images (four DICOM, one 16-bit PNG) whose DICOM headers hold the patient's name, reference and
birth date, and annotations by the accredited readers of ``params.yaml`` on which the readers
disagree twice, once as a tie. Tests change the default lists to build the bad input they need::

    patients, images, annotations = default_patients(), default_images(), default_annotations()
    patients[0].sex = "X"
    export = write_export(tmp_path / "export", patients, images, annotations)

Pixels are a downsampled crop of pydicom's ``RG3_UNCR.dcm`` radiograph (installed by
``pydicom-data``, read locally), shifted per image so that no two files are identical.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

PATIENT_COLUMNS = ["patient_ref", "first_name", "last_name", "age", "sex", "bmi"]
ANNOTATION_COLUMNS = ["image", "patient_ref", "reader_id", "label", "annotated_at"]
CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DEFAULT_SHAPE = (32, 26)


@dataclass
class Patient:
    """One row of patients.csv, plus the birth date written into the patient's DICOM headers.

    Values are strings so that tests can write malformed ones (``age="old"``).
    """

    patient_ref: str
    first_name: str
    last_name: str
    age: str = "67"
    sex: str = "F"
    bmi: str = "24.5"
    birth_date: str = "19560101"

    def row(self) -> dict[str, str]:
        return {column: getattr(self, column) for column in PATIENT_COLUMNS}


@dataclass
class ImageSpec:
    """One file of images/.

    Attributes:
        name: file name under images/, e.g. ``IMG0001.dcm``.
        patient_ref: whose identity goes into the DICOM header.
        format: ``dicom`` or ``png``.
        photometric: ``MONOCHROME1`` or ``MONOCHROME2`` (DICOM only).
        pixels: stored values; defaults to the sample radiograph shifted by ``seed``.
        seed: shift of the default pixels, so that files differ.
    """

    name: str
    patient_ref: str
    format: str = "dicom"
    photometric: str = "MONOCHROME2"
    pixels: np.ndarray | None = None
    seed: int = 0


@dataclass
class Annotation:
    """One row of annotations.csv."""

    image: str
    patient_ref: str
    reader_id: str = "RAD01"
    label: str = "normal"
    annotated_at: str = "2023-03-01T09:30:00"

    def row(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class Export:
    """A written export and what it was made of."""

    directory: Path
    patients: list[Patient]
    images: list[ImageSpec]
    annotations: list[Annotation] = field(default_factory=list)

    @property
    def images_dir(self) -> Path:
        return self.directory / "images"

    @property
    def patients_csv(self) -> Path:
        return self.directory / "patients.csv"

    @property
    def annotations_csv(self) -> Path:
        return self.directory / "annotations.csv"

    def identifying_values(self) -> set[str]:
        """Every name, reference and birth date (two spellings) of the export's patients."""
        values: set[str] = set()
        for patient in self.patients:
            values |= {patient.patient_ref, patient.first_name, patient.last_name}
            birth = patient.birth_date
            values |= {birth, f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"}
        return {value for value in values if len(value) >= 3}


# ---------------------------------------------------------------------------------- pixels


@lru_cache(maxsize=1)
def _sample_radiograph() -> np.ndarray:
    path = get_testdata_file("RG3_UNCR.dcm")
    if path is None:
        raise FileNotFoundError("RG3_UNCR.dcm is missing: install pydicom-data")
    pixels: np.ndarray = pydicom.dcmread(path).pixel_array
    return pixels


def sample_pixels(shape: tuple[int, int] = DEFAULT_SHAPE, seed: int = 0) -> np.ndarray:
    """A small radiograph (uint16, 10 significant bits) downsampled from ``RG3_UNCR.dcm``.

    Args:
        shape: rows, columns of the result.
        seed: added to every pixel (then kept within 10 bits) so that images differ.
    """
    full = _sample_radiograph()
    step = max(1, min(full.shape[0] // shape[0], full.shape[1] // shape[1]))
    small = full[::step, ::step][: shape[0], : shape[1]].astype(np.uint16)
    return np.minimum(small + np.uint16(seed * 7), np.uint16(1023))


def make_dicom(
    path: Path,
    patient_ref: str,
    name: str = "DOE^JANE",
    birth_date: str = "19500101",
    pixels: np.ndarray | None = None,
    photometric: str = "MONOCHROME2",
    modality: str = "CR",
    with_pixels: bool = True,
) -> Path:
    """Write a single-frame DICOM radiograph carrying identifying attributes.

    Args:
        path: where to write it.
        patient_ref: written as PatientID.
        name: PatientName, ``LAST^FIRST``.
        birth_date: PatientBirthDate, ``YYYYMMDD``.
        pixels: stored values (uint16 or uint8); defaults to ``sample_pixels()``.
        photometric: PhotometricInterpretation.
        modality: ``CR`` or ``DX``.
        with_pixels: False writes a header without a Pixel Data element.

    Returns:
        The path written.
    """
    pixels = sample_pixels() if pixels is None else pixels
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, for accented names
    ds.SOPClassUID, ds.SOPInstanceUID = CR_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, patient_ref, birth_date
    ds.InstitutionName = "Clinique des Tilleuls"
    ds.Modality, ds.BodyPartExamined = modality, "HIP"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    bits = 16 if pixels.dtype.itemsize == 2 else 8
    stored = 10 if bits == 16 else 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, stored, stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
    ds.WindowCenter, ds.WindowWidth = "512", "1024"
    if with_pixels:
        ds.PixelData = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_png(
    path: Path, pixels: np.ndarray | None = None, bit_depth: int = 16,
    significant_bits: int | None = None,
) -> Path:
    """Write a grayscale PNG (16-bit by default, or 8-bit).

    Args:
        path: where to write it.
        pixels: values; defaults to ``sample_pixels()``.
        bit_depth: 16 or 8.
        significant_bits: declared in an sBIT chunk when given.

    Returns:
        The path written.
    """
    pixels = sample_pixels() if pixels is None else pixels
    array = pixels.astype(np.uint16 if bit_depth == 16 else np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = PngInfo()
    if significant_bits is not None:
        chunks.add(b"sBIT", bytes([significant_bits]))
    Image.fromarray(array).save(path, format="PNG", pnginfo=chunks)
    return path


def png_bytes(pixels: np.ndarray) -> bytes:
    """The bytes of a 16-bit grayscale PNG of ``pixels``."""
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------- exports


def default_patients() -> list[Patient]:
    """Three patients; names with accents, quotes and a comma exercise CSV quoting."""
    return [
        Patient("HOSP-000101", "Zoë", "Łukasiewicz-Müller", "71", "F", "22.1", "19520214"),
        Patient("HOSP-000102", 'Seán "Jack"', "O'Brien, Jr.", "64", "M", "27.3", "19590630"),
        Patient("HOSP-000103", "Ingrid", "Svensson", "58", "F", "31.0", "19651105"),
    ]


def default_images() -> list[ImageSpec]:
    """Five images: patient 101 has two DICOMs (one MONOCHROME1), 102 a DICOM and a PNG."""
    return [
        ImageSpec("IMG0001.dcm", "HOSP-000101", photometric="MONOCHROME1", seed=1),
        ImageSpec("IMG0002.dcm", "HOSP-000101", seed=2),
        ImageSpec("IMG0003.dcm", "HOSP-000102", seed=3),
        ImageSpec("IMG0004.png", "HOSP-000102", format="png", seed=4),
        ImageSpec("IMG0005.dcm", "HOSP-000103", seed=5),
    ]


def default_annotations() -> list[Annotation]:
    """Consensus: 1 osteoporosis (unanimous), 2 osteoporosis (tie), 3 normal (2 of 3), 4 normal,
    5 osteoporosis."""
    return [
        Annotation("IMG0001.dcm", "HOSP-000101", "RAD01", "osteoporosis", "2023-03-01T09:30:00"),
        Annotation("IMG0001.dcm", "HOSP-000101", "RAD02", "osteoporosis", "2023-03-02T10:00:00"),
        Annotation("IMG0002.dcm", "HOSP-000101", "RAD01", "normal", "2023-03-01T09:35:00"),
        Annotation("IMG0002.dcm", "HOSP-000101", "RAD02", "osteoporosis", "2023-03-02T10:05:00"),
        Annotation("IMG0003.dcm", "HOSP-000102", "RAD01", "normal", "2023-03-01T09:40:00"),
        Annotation("IMG0003.dcm", "HOSP-000102", "RAD02", "normal", "2023-03-02T10:10:00Z"),
        Annotation("IMG0003.dcm", "HOSP-000102", "RAD03", "osteoporosis", "2023-03-03T11:00:00"),
        Annotation("IMG0004.png", "HOSP-000102", "RAD02", "normal", "2023-03-02T10:15:00+01:00"),
        Annotation("IMG0005.dcm", "HOSP-000103", "RAD03", "osteoporosis", "2023-03-03"),
    ]


def write_csv(path: Path, columns: list[str], rows: Iterable[dict[str, str]]) -> Path:
    """Write a CSV with standard quoting (values with commas or quotes are quoted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_image(images_dir: Path, spec: ImageSpec, patients: dict[str, Patient]) -> Path:
    """Write one image of an export, with its patient's identity in the DICOM header."""
    pixels = spec.pixels if spec.pixels is not None else sample_pixels(seed=spec.seed)
    path = images_dir / spec.name
    if spec.format == "png":
        return make_png(path, pixels)
    patient = patients.get(spec.patient_ref)
    name = f"{patient.last_name}^{patient.first_name}" if patient else "UNKNOWN^PATIENT"
    birth_date = patient.birth_date if patient else "19000101"
    return make_dicom(path, spec.patient_ref, name, birth_date, pixels, spec.photometric)


def write_export(
    directory: Path,
    patients: list[Patient] | None = None,
    images: list[ImageSpec] | None = None,
    annotations: list[Annotation] | None = None,
) -> Export:
    """Write an export directory: patients.csv, annotations.csv and images/.

    Args:
        directory: the export directory (created).
        patients: rows of patients.csv; the three default patients when omitted.
        images: files of images/; the five default images when omitted.
        annotations: rows of annotations.csv; the default annotations when omitted.

    Returns:
        The export, with its paths and contents.
    """
    patients = default_patients() if patients is None else patients
    images = default_images() if images is None else images
    annotations = default_annotations() if annotations is None else annotations
    by_ref = {patient.patient_ref: patient for patient in patients}

    (directory / "images").mkdir(parents=True, exist_ok=True)
    write_csv(directory / "patients.csv", PATIENT_COLUMNS, (p.row() for p in patients))
    write_csv(directory / "annotations.csv", ANNOTATION_COLUMNS, (a.row() for a in annotations))
    for spec in images:
        write_image(directory / "images", spec, by_ref)
    return Export(directory, patients, images, annotations)
