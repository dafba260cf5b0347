"""Ingest: export checks, accredited readers' consensus, and one quarantine reason per bad input.

Row numbers follow the spreadsheet convention: the header is row 1, so the default export's
patients are rows 2-4 and its nine annotations rows 2-10.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gdcm
import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

import tasks.ingest as ingest_module
from osteo.config import load_params
from osteo.layout import Layout
from osteo.shards import read_shard, shard_members, shard_paths
from osteo.summary import StageSummary
from tasks.ingest import ExportError, consensus, ingest
from tasks.preprocess import to_model_input
from tests.exports import (
    Annotation,
    Export,
    ImageSpec,
    Patient,
    default_annotations,
    default_images,
    default_patients,
    make_dicom,
    make_png,
    png_bytes,
    sample_pixels,
    write_csv,
    write_export,
)
from tests.radiographs import read_test_radiograph


@dataclass
class Ingested:
    """What one ingest run left behind."""

    summary: StageSummary
    records: pd.DataFrame
    quarantine: pd.DataFrame

    def record(self, image: str) -> pd.Series:
        return self.records.set_index("image").loc[image]

    def rejected(self, reason: str) -> pd.DataFrame:
        return self.quarantine[self.quarantine["reason"] == reason]


def make_export(
    project_dir: Path,
    patients: list[Patient] | None = None,
    images: list[ImageSpec] | None = None,
    annotations: list[Annotation] | None = None,
) -> Export:
    return write_export(project_dir / "export", patients, images, annotations)


def run_ingest(project_dir: Path) -> Ingested:
    params = load_params(project_dir)
    params["export"]["path"] = "export"
    layout = Layout(project_dir)
    summary = ingest.fn(layout, params)
    records = pd.read_parquet(layout.ingested_records)
    quarantine = pd.read_csv(layout.quarantine("ingest"), dtype={"row": "Int64"},
                             keep_default_na=False)
    return Ingested(summary, records, quarantine)


def single(rows: pd.DataFrame) -> pd.Series:
    assert len(rows) == 1, rows
    return rows.iloc[0]


# ---------------------------------------------------------------------------------- good export


def test_tiny_export_is_accepted_with_consensus_labels(project_dir: Path) -> None:
    make_export(project_dir)

    result = run_ingest(project_dir)

    assert result.summary.accepted == result.summary.records_in == 5
    assert result.quarantine.empty
    labels = result.records.set_index("image")[["label", "n_readers", "reader_agreement"]]
    assert labels.round(3).to_dict("index") == {
        "IMG0001.dcm": {"label": "osteoporosis", "n_readers": 2, "reader_agreement": 1.0},
        "IMG0002.dcm": {"label": "osteoporosis", "n_readers": 2, "reader_agreement": 0.5},
        "IMG0003.dcm": {"label": "normal", "n_readers": 3, "reader_agreement": 0.667},
        "IMG0004.png": {"label": "normal", "n_readers": 1, "reader_agreement": 1.0},
        "IMG0005.dcm": {"label": "osteoporosis", "n_readers": 1, "reader_agreement": 1.0},
    }


def test_tie_between_readers_goes_to_osteoporosis() -> None:
    assert consensus(["normal", "osteoporosis"]) == ("osteoporosis", 0.5, True)
    assert consensus(["normal", "normal", "osteoporosis"])[:2] == ("normal", 2 / 3)
    assert consensus(["normal"]) == ("normal", 1.0, False)


def test_reader_disagreements_are_reported_in_the_summary(project_dir: Path) -> None:
    make_export(project_dir)

    readers = run_ingest(project_dir).summary.extra["readers"]

    assert readers["images_with_several_readers"] == 3
    assert readers["images_with_disagreement"] == 2
    assert readers["disagreement_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert readers["ties"] == 1
    assert readers["agreement_with_consensus"]["RAD01"] == {"images": 3, "agreement": 0.6667}
    assert readers["agreement_with_consensus"]["RAD02"] == {"images": 3, "agreement": 1.0}


def test_records_keep_patient_values_and_dicom_birth_date(project_dir: Path) -> None:
    export = make_export(project_dir)

    record = run_ingest(project_dir).record("IMG0003.dcm")

    patient = export.patients[1]
    assert (record["first_name"], record["last_name"]) == ('Seán "Jack"', "O'Brien, Jr.")
    assert (record["patient_ref"], record["sex"], record["age"], record["bmi"]) == (
        patient.patient_ref, "M", 64.0, 27.3
    )
    assert record["birth_date"] == patient.birth_date
    assert record["sha256"] == hashlib.sha256(
        (export.images_dir / "IMG0003.dcm").read_bytes()
    ).hexdigest()


def test_manifest_lists_every_export_file_with_its_sha256(project_dir: Path) -> None:
    export = make_export(project_dir)
    (export.directory / "README.txt").write_text("export of 2023-03\n")

    run_ingest(project_dir)

    manifest = pd.read_csv(Layout(project_dir).manifest).set_index("file")
    files = sorted(p for p in export.directory.rglob("*") if p.is_file())
    assert sorted(manifest.index) == sorted(p.relative_to(export.directory).as_posix()
                                            for p in files)
    for path in files:
        row = manifest.loc[path.relative_to(export.directory).as_posix()]
        assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert row["bytes"] == path.stat().st_size


def test_records_in_counts_images_orphan_annotation_names_and_orphan_patients(
    project_dir: Path,
) -> None:
    patients = default_patients() + [Patient("HOSP-000104", "Nadia", "Benali")]
    annotations = default_annotations() + [
        Annotation("IMG0099.dcm", "HOSP-000101", "RAD01"),
        Annotation("IMG0099.dcm", "HOSP-000101", "RAD02"),
    ]
    export = make_export(project_dir, patients, annotations=annotations)
    (export.images_dir / "notes.txt").write_text("not an image")

    summary = run_ingest(project_dir).summary

    assert summary.records_in == 6 + 1 + 1  # image files, missing image name, lonely patient
    assert summary.accepted == 5
    assert summary.quarantined == {
        "not_an_image": 1, "annotation_without_image": 1, "patient_without_image": 1,
    }
    assert summary.extra["annotations"] == {
        "in": 11, "used": 9, "quarantined": {"annotation_without_image": 2},
    }


# ---------------------------------------------------------------------------------- export errors


def test_missing_csv_is_an_export_error_naming_the_file(project_dir: Path) -> None:
    export = make_export(project_dir)
    export.annotations_csv.unlink()

    with pytest.raises(ExportError) as error:
        run_ingest(project_dir)

    assert error.value.file.endswith("annotations.csv")
    assert "annotations.csv" in str(error.value) and "missing" in str(error.value)


def test_missing_and_extra_columns_are_one_export_error(project_dir: Path) -> None:
    export = make_export(project_dir)
    columns = ["patient_ref", "first_name", "last_name", "age", "sex", "weight"]
    rows = [{column: p.row().get(column, "61") for column in columns} for p in export.patients]
    write_csv(export.patients_csv, columns, rows)

    with pytest.raises(ExportError) as error:
        run_ingest(project_dir)

    message = str(error.value)
    assert error.value.row == 1
    assert "patients.csv row 1" in message
    assert "missing columns: bmi" in message and "unexpected columns: weight" in message
    assert "HOSP-000101" not in message


def test_missing_export_directory_is_an_export_error(project_dir: Path) -> None:
    with pytest.raises(ExportError, match="export directory not found"):
        run_ingest(project_dir)


# ---------------------------------------------------------------------------------- bad images


def test_truncated_dicom_is_quarantined(project_dir: Path) -> None:
    export = make_export(project_dir)
    path = export.images_dir / "IMG0002.dcm"
    path.write_bytes(path.read_bytes()[:-300])

    result = run_ingest(project_dir)

    rejection = single(result.rejected("truncated_image"))
    assert rejection["source"] == "images/IMG0002.dcm"
    assert "Pixel Data holds" in rejection["detail"]
    assert result.summary.accepted == 4


@pytest.mark.parametrize(("significant_bits", "bits_stored"), [
    (None, 16), (12, 12), (0, 16), (17, 16),  # no sBIT chunk, a valid one, two out of range
])
def test_png_bits_stored_is_what_its_sbit_chunk_declares(
    tmp_path: Path, significant_bits: int | None, bits_stored: int,
) -> None:
    path = make_png(tmp_path / "image.png", sample_pixels(), significant_bits=significant_bits)

    image, _ = ingest_module.inspect_image(path, path.name, 32)

    assert image.pixels["bits_stored"] == bits_stored
    assert (image.pixels["rescale_slope"], image.pixels["rescale_intercept"]) == (1.0, 0.0)


def test_dicom_without_rescale_is_read_with_the_identity(tmp_path: Path) -> None:
    """pydicom-data's computed radiographs, like many CR images, carry no rescale."""
    path = Path(str(get_testdata_file("RG3_UNCR.dcm")))
    assert "RescaleSlope" not in pydicom.dcmread(path, stop_before_pixels=True)

    image, model_input = ingest_module.inspect_image(path, path.name, 32)

    assert image.reason == "" and model_input is not None
    assert (image.pixels["rescale_slope"], image.pixels["rescale_intercept"]) == (1.0, 0.0)
    assert (image.pixels["window_center"], image.pixels["window_width"]) == (550.0, 1024.0)


def test_corrupt_png_is_quarantined(project_dir: Path) -> None:
    export = make_export(project_dir)
    path = export.images_dir / "IMG0004.png"
    path.write_bytes(path.read_bytes()[:200])

    result = run_ingest(project_dir)

    assert single(result.rejected("corrupt_image"))["source"] == "images/IMG0004.png"
    assert result.summary.accepted == 4


def png_with_corrupt_pixel_stream(pixels: np.ndarray) -> bytes:
    """A PNG whose chunks and checksums are intact but whose compressed pixels are garbage."""
    blob = png_bytes(pixels)
    chunks, position = [blob[:8]], 8
    while position < len(blob):
        length, kind = struct.unpack(">I4s", blob[position:position + 8])
        data = blob[position + 8:position + 8 + length]
        if kind == b"IDAT":
            data = b"\x78\x9c" + bytes(range(7, 7 + 200))
        checksum = struct.pack(">I", zlib.crc32(kind + data))
        chunks.append(struct.pack(">I", len(data)) + kind + data + checksum)
        position += 12 + length
    return b"".join(chunks)


def test_image_whose_pixels_cannot_be_decoded_is_quarantined(project_dir: Path) -> None:
    """The header is sound, so only decoding the pixels finds the fault."""
    export = make_export(project_dir)
    path = export.images_dir / "IMG0004.png"
    path.write_bytes(png_with_corrupt_pixel_stream(sample_pixels(seed=4)))

    result = run_ingest(project_dir)

    rejection = single(result.rejected("undecodable_pixels"))
    assert rejection["source"] == "images/IMG0004.png"
    assert rejection["detail"].startswith("pixels cannot be decoded")
    assert result.summary.accepted == 4
    assert "IMG0004.png" not in set(result.records["image"])


def test_each_image_is_decoded_once_into_its_model_input_and_statistics(
    project_dir: Path,
) -> None:
    export = make_export(project_dir)

    result = run_ingest(project_dir)

    pixel_dir = Layout(project_dir).ingest_pixel_dir
    size = load_params(project_dir)["preprocess"]["size"]
    for spec in export.images:
        record = result.record(spec.name)
        path = export.images_dir / spec.name
        stored = (pydicom.dcmread(path).pixel_array if spec.format == "dicom"
                  else np.asarray(Image.open(path)))
        with read_shard(pixel_dir / record["pixel_shard"]) as shard:
            model_input = shard[record["pixel_member"]]
        np.testing.assert_array_equal(model_input, to_model_input(stored, record, size))
        assert model_input.shape == (size, size) and model_input.dtype == np.float16
        assert (record["height"], record["width"]) == stored.shape
        assert record["stored_max"] == stored.max()
        assert record["content_key"] == hashlib.sha256(model_input.tobytes()).hexdigest()
        assert pd.isna(record["input_reason"])


def test_an_image_no_model_input_can_be_made_of_is_recorded_with_the_reason(
    project_dir: Path,
) -> None:
    """A window far above every stored value leaves a uniform picture: ingest keeps the record
    and its statistics, for the validate stage to quarantine with the reason, but no pixels."""
    export = make_export(project_dir)
    path = export.images_dir / "IMG0001.dcm"
    dataset = pydicom.dcmread(path)
    dataset.WindowCenter, dataset.WindowWidth = 60000, 10
    dataset.save_as(path)

    result = run_ingest(project_dir)

    record = result.record("IMG0001.dcm")
    assert record["input_reason"] == "uniform_after_window"
    assert "after windowing" in record["input_detail"]
    assert pd.isna(record["pixel_shard"]) and pd.isna(record["content_key"])
    assert record["stored_max"] > 0
    assert result.summary.accepted == 5


def test_only_accepted_images_keep_their_pixels_under_neutral_names(project_dir: Path) -> None:
    """A quarantined image leaves no pixels behind; member names do not carry file names."""
    export = make_export(project_dir)
    shutil.copy(export.images_dir / "IMG0001.dcm", export.images_dir / "IMG0009.dcm")

    result = run_ingest(project_dir)

    members = [name for path in shard_paths(Layout(project_dir).ingest_pixel_dir)
               for name in shard_members(path)]
    assert single(result.rejected("duplicate_file"))["source"] == "images/IMG0009.dcm"
    assert sorted(members) == sorted(result.records["pixel_member"]) and len(members) == 5
    assert not [name for name in members if "IMG" in name]


def test_non_image_file_in_images_is_quarantined(project_dir: Path) -> None:
    export = make_export(project_dir)
    (export.images_dir / "Thumbs.db").write_bytes(b"\x00\x01thumbnail cache")

    result = run_ingest(project_dir)

    rejection = single(result.rejected("not_an_image"))
    assert rejection["source"] == "images/Thumbs.db"
    assert result.summary.accepted == 5


def test_unreadable_dicom_is_quarantined(project_dir: Path) -> None:
    export = make_export(project_dir)
    (export.images_dir / "IMG0005.dcm").write_bytes(b"this is not a DICOM file" * 20)

    result = run_ingest(project_dir)

    assert single(result.rejected("unreadable_dicom"))["source"] == "images/IMG0005.dcm"
    assert result.summary.accepted == 4


def compressed_copy(source: Path, target: Path, transfer_syntax: str) -> Path:
    """``source`` with its pixels re-encoded by GDCM in another transfer syntax."""
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, transfer_syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return target


def padded_tibia(path: Path, declared: bool) -> tuple[Path, np.ndarray]:
    """pydicom-data's tibia CR on a round field: the corners hold 4095, a value its 10-bit
    pixels never reach, declared as Pixel Padding Value or not. Read as MONOCHROME2 without a
    window, so that undeclared padding would show white and stretch the percentile window.

    Returns:
        The file, and the mask of its padding pixels.
    """
    dataset = read_test_radiograph("RG3_UNCR.dcm")
    pixels = dataset.pixel_array.copy()
    rows, columns = np.indices(pixels.shape)
    centre = (np.array(pixels.shape) - 1) / 2
    padding = (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 > (0.45 * pixels.shape[0]) ** 2
    pixels[padding] = 4095
    dataset.PixelData = pixels.tobytes()
    dataset.BitsStored, dataset.HighBit = 12, 11
    dataset.PhotometricInterpretation = "MONOCHROME2"
    del dataset.WindowCenter, dataset.WindowWidth
    if declared:
        dataset.add_new("PixelPaddingValue", "US", 4095)
    dataset.save_as(path)
    return path, padding


def test_declared_pixel_padding_is_left_out_of_the_statistics_and_shown_black(
    tmp_path: Path,
) -> None:
    path, padding = padded_tibia(tmp_path / "declared.dcm", declared=True)
    undeclared, _ = padded_tibia(tmp_path / "undeclared.dcm", declared=False)
    image_pixels = pydicom.dcmread(path).pixel_array[~padding]

    image, model_input = ingest_module.inspect_image(path, path.name, 64)
    plain, plain_input = ingest_module.inspect_image(undeclared, undeclared.name, 64)

    assert image.reason == plain.reason == "" and model_input is not None
    assert plain_input is not None
    assert image.pixels["stored_max"] == image_pixels.max() and image.pixels["bits_used"] == 10
    assert plain.pixels["stored_max"] == 4095 and plain.pixels["bits_used"] == 12
    assert image.pixels["pixel_mean"] == pytest.approx(image_pixels.mean(), rel=0.05)
    corners = model_input[:6, :6], model_input[-6:, -6:], plain_input[:6, :6]
    assert corners[0].max() == corners[1].max() == 0 and corners[2].min() > 0.99
    # The percentile window of the image pixels alone spreads the tissue over more of [0, 1].
    field = ~np.pad(padding[::27, ::27], 1)[:64, :64]
    assert model_input[field].astype(np.float32).std() > plain_input[field].astype(
        np.float32).std()


def test_dicom_made_only_of_padding_is_quarantined_as_blank(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "blank.dcm", "HOSP-000103",
                      pixels=np.full((64, 52), 0, dtype=np.uint16))
    dataset = pydicom.dcmread(path)
    dataset.add_new("PixelPaddingValue", "US", 0)
    dataset.save_as(path)

    image, model_input = ingest_module.inspect_image(path, path.name, 32)

    assert image.reason == "image_blank" and model_input is None
    assert "Pixel Padding Value" in image.detail


@pytest.mark.parametrize(("transfer_syntax", "uid"), [
    ("JPEGLosslessProcess14_1", "1.2.840.10008.1.2.4.70"),  # what PACS exports mostly use
    ("JPEGLSLossless", "1.2.840.10008.1.2.4.80"),
    ("JPEG2000Lossless", "1.2.840.10008.1.2.4.90"),
    ("RLELossless", "1.2.840.10008.1.2.5"),
])
def test_losslessly_compressed_dicom_gives_the_same_model_input(
    tmp_path: Path, transfer_syntax: str, uid: str,
) -> None:
    original = make_dicom(tmp_path / "original.dcm", "HOSP-000103", photometric="MONOCHROME1")
    compressed = compressed_copy(original, tmp_path / "compressed.dcm", transfer_syntax)
    assert pydicom.dcmread(compressed).file_meta.TransferSyntaxUID == uid

    plain, plain_input = ingest_module.inspect_image(original, original.name, 64)
    image, model_input = ingest_module.inspect_image(compressed, compressed.name, 64)

    assert image.reason == "" and model_input is not None and plain_input is not None
    assert image.pixels == plain.pixels  # statistics and content key of the same pixels
    np.testing.assert_array_equal(model_input, plain_input)


@pytest.mark.parametrize(("keyword", "raw"), [
    ("Rows", b"\x00\x02\x00"),  # an unsigned short (US) of three bytes
    ("BitsAllocated", b"\x10"),  # of one byte
    ("NumberOfFrames", b"one "),  # an integer string (IS) that is no number
])
def test_dicom_with_a_malformed_header_value_is_quarantined(
    project_dir: Path, keyword: str, raw: bytes,
) -> None:
    """pydicom parses the file but cannot convert the value: one image, not the run, fails."""
    export = make_export(project_dir)
    path = export.images_dir / "IMG0005.dcm"
    make_dicom(path, "HOSP-000103")
    dataset = pydicom.dcmread(path)
    tag = Tag(keyword)
    dataset[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
    dataset.save_as(path)

    result = run_ingest(project_dir)

    rejection = single(result.rejected("unreadable_dicom"))
    assert rejection["source"] == "images/IMG0005.dcm"
    assert f"{keyword} {tag}" in rejection["detail"]
    assert result.summary.accepted == 4


def test_dicom_whose_birth_date_has_an_unknown_value_representation_is_quarantined(
    project_dir: Path,
) -> None:
    """An identifying attribute pydicom cannot read: the detail names it, never its value."""
    export = make_export(project_dir)
    path = export.images_dir / "IMG0005.dcm"
    make_dicom(path, "HOSP-000103", birth_date="19470312")
    element = b"\x10\x00\x30\x00DA"  # (0010,0030) Patient's Birth Date, explicit VR "DA"
    data = path.read_bytes()
    assert data.count(element) == 1
    path.write_bytes(data.replace(element, b"\x10\x00\x30\x00D\xce"))

    result = run_ingest(project_dir)

    rejection = single(result.rejected("unreadable_dicom"))
    assert rejection["source"] == "images/IMG0005.dcm"
    assert "PatientBirthDate" in rejection["detail"]
    assert "19470312" not in rejection["detail"]
    assert result.summary.accepted == 4


IMAGE_REASONS = {
    "unreadable_dicom", "dicom_without_pixels", "unsupported_image", "truncated_image",
    "undecodable_pixels", "burned_in_annotation", "burned_in_annotation_unknown",
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about each damaged element
def test_damaged_dicom_headers_end_in_a_reason_never_an_exception(tmp_path: Path) -> None:
    """Bytes of the header overwritten, cut out or inserted, 1000 times (seeded)."""
    original = make_dicom(tmp_path / "original.dcm", "HOSP-000103").read_bytes()
    header_end = original.index(b"\xe0\x7f\x10\x00")  # the Pixel Data element's tag
    rng = np.random.default_rng(7)
    outcomes: set[str] = set()
    for attempt in range(1000):
        data = bytearray(original)
        for _ in range(rng.integers(1, 6, endpoint=True)):
            position, change = int(rng.integers(min(header_end, len(data)))), rng.random()
            if change < 0.6:
                data[position] = int(rng.integers(256))
            elif change < 0.8:
                del data[position:position + int(rng.integers(1, 8, endpoint=True))]
            else:
                data[position:position] = rng.bytes(int(rng.integers(1, 8, endpoint=True)))
        path = tmp_path / "damaged.dcm"
        path.write_bytes(bytes(data))

        image, _ = ingest_module.inspect_image(path, path.name, 32)

        assert image.reason in IMAGE_REASONS or (not image.reason and image.pixels), attempt
        outcomes.add(image.reason or "usable")
    assert {"unreadable_dicom", "usable"} <= outcomes


def test_dicom_with_a_modality_lut_sequence_is_quarantined(project_dir: Path) -> None:
    """Its LUT, not a rescale, gives the modality values; ingest does not apply LUTs."""
    export = make_export(project_dir)
    path = export.images_dir / "IMG0005.dcm"
    make_dicom(path, "HOSP-000103")
    dataset = pydicom.dcmread(path)
    lut = Dataset()
    lut.add_new("LUTDescriptor", "US", [4, 0, 16])
    lut.ModalityLUTType = "OD"
    lut.add_new("LUTData", "OW", np.array([0, 10, 20, 30], dtype="<u2").tobytes())
    dataset.ModalityLUTSequence = [lut]
    del dataset.RescaleSlope, dataset.RescaleIntercept
    dataset.save_as(path)

    result = run_ingest(project_dir)

    rejection = single(result.rejected("unsupported_image"))
    assert rejection["source"] == "images/IMG0005.dcm"
    assert "Modality LUT Sequence" in rejection["detail"]
    assert result.summary.accepted == 4


def test_dicom_without_pixel_data_is_quarantined(project_dir: Path) -> None:
    export = make_export(project_dir)
    make_dicom(export.images_dir / "IMG0005.dcm", "HOSP-000103", with_pixels=False)

    result = run_ingest(project_dir)

    assert single(result.rejected("dicom_without_pixels"))["source"] == "images/IMG0005.dcm"
    assert result.summary.accepted == 4


def test_image_with_burned_in_annotation_is_quarantined(project_dir: Path) -> None:
    import pydicom

    export = make_export(project_dir)
    path = export.images_dir / "IMG0005.dcm"
    make_dicom(path, "HOSP-000103")
    dataset = pydicom.dcmread(path)
    dataset.BurnedInAnnotation = "YES"
    dataset.save_as(path)

    result = run_ingest(project_dir)

    assert single(result.rejected("burned_in_annotation"))["source"] == "images/IMG0005.dcm"
    assert result.summary.accepted == 4


def test_duplicate_file_keeps_the_first_and_quarantines_the_other(project_dir: Path) -> None:
    export = make_export(project_dir)
    shutil.copy(export.images_dir / "IMG0005.dcm", export.images_dir / "IMG0006.dcm")

    result = run_ingest(project_dir)

    rejection = single(result.rejected("duplicate_file"))
    assert rejection["source"] == "images/IMG0006.dcm"
    assert "images/IMG0005.dcm" in rejection["detail"]
    assert "IMG0005.dcm" in set(result.records["image"])


# ---------------------------------------------------------------------------------- bad patients


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [("sex", "X", "unknown_sex"), ("age", "sixty", "age_not_a_number"),
     ("bmi", "n/a", "bmi_not_a_number")],
)
def test_unusable_patient_value_quarantines_the_patients_images(
    project_dir: Path, column: str, value: str, reason: str
) -> None:
    patients = default_patients()
    setattr(patients[2], column, value)
    make_export(project_dir, patients)

    result = run_ingest(project_dir)

    rejection = single(result.rejected(reason))
    assert rejection["source"] == "images/IMG0005.dcm"
    assert f"patients.csv row 4: {column}" in rejection["detail"]
    assert value not in rejection["detail"]
    assert result.summary.accepted == 4


def test_unknown_sex_is_quarantined(project_dir: Path) -> None:
    patients = default_patients()
    patients[0].sex = "unknown"
    make_export(project_dir, patients)

    result = run_ingest(project_dir)

    assert set(result.rejected("unknown_sex")["source"]) == {
        "images/IMG0001.dcm", "images/IMG0002.dcm",
    }
    assert result.summary.quarantined == {"unknown_sex": 2}


def test_patient_without_image_is_quarantined(project_dir: Path) -> None:
    make_export(project_dir, default_patients() + [Patient("HOSP-000104", "Nadia", "Benali")])

    result = run_ingest(project_dir)

    rejection = single(result.rejected("patient_without_image"))
    assert (rejection["source"], rejection["row"]) == ("patients.csv", 5)
    assert result.summary.records_in == 6 and result.summary.accepted == 5


def test_duplicate_patient_ref_row_is_quarantined_and_the_first_kept(project_dir: Path) -> None:
    duplicate = Patient("HOSP-000103", "Ingrid", "Svensson", "99", "M", "40.0")
    make_export(project_dir, default_patients() + [duplicate])

    result = run_ingest(project_dir)

    rejection = single(result.rejected("duplicate_patient_ref"))
    assert (rejection["source"], rejection["row"]) == ("patients.csv", 5)
    assert "row 4" in rejection["detail"]
    assert result.record("IMG0005.dcm")["age"] == 58.0


def test_row_with_an_unquoted_comma_is_quarantined_as_malformed(project_dir: Path) -> None:
    export = make_export(project_dir)
    with export.patients_csv.open("a", encoding="utf-8") as handle:
        handle.write("HOSP-000104,Nadia,Benali, Jr.,50,F,21.0\n")

    result = run_ingest(project_dir)

    rejection = single(result.rejected("malformed_row"))
    assert (rejection["source"], rejection["row"]) == ("patients.csv", 5)
    assert result.summary.accepted == 5


# ---------------------------------------------------------------------------------- bad annotations


def test_image_without_annotation_is_quarantined(project_dir: Path) -> None:
    make_export(project_dir, images=default_images() + [ImageSpec("IMG0006.dcm", "HOSP-000103",
                                                                 seed=6)])

    result = run_ingest(project_dir)

    assert single(result.rejected("no_annotation"))["source"] == "images/IMG0006.dcm"
    assert result.summary.accepted == 5


def test_image_without_accredited_annotation_is_quarantined(project_dir: Path) -> None:
    images = default_images() + [ImageSpec("IMG0006.dcm", "HOSP-000103", seed=6)]
    annotations = default_annotations() + [Annotation("IMG0006.dcm", "HOSP-000103", "RAD77")]
    make_export(project_dir, images=images, annotations=annotations)

    result = run_ingest(project_dir)

    rejection = single(result.rejected("no_accredited_annotation"))
    assert rejection["source"] == "images/IMG0006.dcm"
    assert "row 11" in rejection["detail"]
    assert single(result.rejected("unaccredited_reader"))["row"] == 11


def test_unknown_reader_annotation_is_quarantined(project_dir: Path) -> None:
    annotations = default_annotations() + [
        Annotation("IMG0005.dcm", "HOSP-000103", "RAD77", "normal", "2023-03-04T08:00:00"),
    ]
    make_export(project_dir, annotations=annotations)

    result = run_ingest(project_dir)

    rejection = single(result.rejected("unaccredited_reader"))
    assert (rejection["source"], rejection["row"]) == ("annotations.csv", 11)
    assert "RAD77" not in rejection["detail"]
    record = result.record("IMG0005.dcm")
    assert (record["label"], record["n_readers"]) == ("osteoporosis", 1)


def test_annotation_without_image_is_quarantined(project_dir: Path) -> None:
    annotations = default_annotations() + [Annotation("IMG0099.dcm", "HOSP-000103")]
    make_export(project_dir, annotations=annotations)

    result = run_ingest(project_dir)

    rejection = single(result.rejected("annotation_without_image"))
    assert (rejection["source"], rejection["row"]) == ("annotations.csv", 11)
    assert "IMG0099" not in rejection["detail"]
    assert result.summary.quarantined == {"annotation_without_image": 1}
    assert result.summary.records_in == 6


def test_annotation_with_unknown_label_is_quarantined(project_dir: Path) -> None:
    annotations = default_annotations()
    annotations[6].label = "fracture"  # IMG0003, RAD03
    make_export(project_dir, annotations=annotations)

    result = run_ingest(project_dir)

    assert single(result.rejected("unknown_label"))["row"] == 8
    record = result.record("IMG0003.dcm")
    assert (record["label"], record["n_readers"], record["reader_agreement"]) == ("normal", 2, 1.0)


def test_annotation_for_unknown_patient_is_quarantined(project_dir: Path) -> None:
    annotations = default_annotations() + [
        Annotation("IMG0005.dcm", "HOSP-999999", "RAD01", "normal", "2023-03-04T08:00:00"),
    ]
    make_export(project_dir, annotations=annotations)

    result = run_ingest(project_dir)

    rejection = single(result.rejected("unknown_patient"))
    assert rejection["row"] == 11
    assert "HOSP-999999" not in rejection["detail"]
    assert result.record("IMG0005.dcm")["n_readers"] == 1


def test_unparseable_annotated_at_is_quarantined(project_dir: Path) -> None:
    annotations = default_annotations()
    annotations[0].annotated_at = "yesterday morning"
    make_export(project_dir, annotations=annotations)

    result = run_ingest(project_dir)

    assert single(result.rejected("unparseable_annotated_at"))["row"] == 2
    assert result.record("IMG0001.dcm")["n_readers"] == 1


def test_annotations_naming_two_patients_quarantine_the_image(project_dir: Path) -> None:
    annotations = default_annotations()
    annotations[1].patient_ref = "HOSP-000103"  # IMG0001, RAD02 names another patient
    make_export(project_dir, annotations=annotations)

    result = run_ingest(project_dir)

    assert single(result.rejected("conflicting_patient_ref"))["source"] == "images/IMG0001.dcm"
    assert set(result.rejected("image_rejected")["row"]) == {2, 3}


def test_later_annotation_of_the_same_reader_supersedes_the_earlier(project_dir: Path) -> None:
    annotations = default_annotations() + [
        Annotation("IMG0002.dcm", "HOSP-000101", "RAD01", "osteoporosis", "2023-04-01T08:00:00"),
    ]
    make_export(project_dir, annotations=annotations)

    result = run_ingest(project_dir)

    assert single(result.rejected("superseded_annotation"))["row"] == 4
    record = result.record("IMG0002.dcm")
    assert (record["label"], record["n_readers"], record["reader_agreement"]) == (
        "osteoporosis", 2, 1.0
    )


# ---------------------------------------------------------------------------------- privacy


def test_quarantine_report_and_logs_hold_no_identifying_value(
    project_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    patients = default_patients() + [Patient("HOSP-000104", "Nadia", "Benali", sex="Nadia")]
    patients[2].age = "HOSP-000103"
    annotations = default_annotations() + [
        Annotation("IMG0005.dcm", "HOSP-GHOST-01", "RAD01"),
        Annotation("HOSP-000101.dcm", "HOSP-000101", "RAD02"),
        Annotation("IMG0004.png", "HOSP-000102", "Benali", "normal"),
    ]
    export = make_export(project_dir, patients, annotations=annotations)
    caplog.set_level(logging.DEBUG)

    result = run_ingest(project_dir)

    assert result.summary.quarantined_total >= 3
    values = export.identifying_values() | {"HOSP-GHOST-01", "Nadia", "Benali"}
    written = [p for d in ("data", "reports") for p in (project_dir / d).rglob("*") if p.is_file()]
    texts = {str(p): p.read_text(encoding="utf-8") for p in written} | {"log": caplog.text}
    leaks = {name: [v for v in values if v in text] for name, text in texts.items()}
    assert written and not {name: found for name, found in leaks.items() if found}


def test_a_worker_process_that_dies_stops_ingest_naming_its_files(
    project_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No file is known to crash a decoder here, so a worker ending abruptly on one file
    stands in for it (the patched function is what the forked workers run)."""
    make_export(project_dir)
    real = ingest_module.inspect_image

    def crashing(path: Path, name: str, size: int) -> Any:
        if name == "IMG0003.dcm":
            os._exit(70)
        return real(path, name, size)

    monkeypatch.setattr(ingest_module, "inspect_image", crashing)

    with pytest.raises(ExportError, match="a worker process stopped") as stopped:
        run_ingest(project_dir)

    assert stopped.value.file.startswith("images/IMG0001.dcm to images/")
    assert not Layout(project_dir).ingested_records.exists()
