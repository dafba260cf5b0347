"""De-identification of real radiographs: no identifying byte survives, pixels and UIDs behave."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

from osteo.deid import (
    ACTION_TABLE,
    BurnedInAnnotationError,
    DeidentificationError,
    deidentify,
    deidentify_file,
    replacement_uid,
)
from tests.radiographs import read_test_radiograph

UID_KEY = b"test-key-of-the-identity-vault-0"
PSEUDONYMS = {"RG1": "P00000000000000a1", "RG3": "P00000000000000a3"}
SHARED_STUDY_UID = "1.2.826.0.1.3680043.8.498.77001"
SHARED_FRAME_UID = "1.2.826.0.1.3680043.8.498.77002"

# Identifying values written into standard attributes, private attributes and sequences.
PATIENT_NAME = "Müller-Lüdenscheidt^Zoë Ann^O'Neil"
IDENTIFYING = {
    "PatientID": "PID-4711-OSTEO",
    "PatientBirthDate": "19520317",
    "InstitutionName": "Klinikum Sankt Irgendwo",
    "InstitutionAddress": "12 Rue des Lilas Lyon",
    "ReferringPhysicianName": "Quartermaine^Hélène^^Dr.",
    "OperatorsName": "Tech^Bartholomew",
    "PerformingPhysicianName": "Radiologue^Amédée",
    "AccessionNumber": "ACC-99817",
    "PatientAddress": "7 Impasse Verte 69003 Lyon",
    "PatientTelephoneNumbers": "+33472001122",
    "OtherPatientIDs": "OPID-55120",
    "StationName": "XRAY-ROOM-7B",
    "DeviceSerialNumber": "SN-A77F90",
    "StudyID": "STUDY-3141",
    "PatientComments": "Lives with her daughter Ophélie",
    "ImageComments": "wrist of Zoë, second attempt",
}
SEARCHED = [PATIENT_NAME, "Müller-Lüdenscheidt", "O'Neil", *IDENTIFYING.values(),
            "REQ-4711", "Quartermaine", "Bartholomew", "Ophélie"]
KEPT = {"PatientAge": "071Y", "PatientSex": "F", "PatientSize": "1.62", "PatientWeight": "58.5"}


def _rehead(dataset: Dataset, referenced_sop_uid: str | None) -> None:
    """Put a patient's identity everywhere an export might carry it."""
    dataset.SpecificCharacterSet = "ISO_IR 192"
    dataset.PatientName = PATIENT_NAME
    for keyword, value in {**IDENTIFYING, **KEPT}.items():
        setattr(dataset, keyword, value)
    dataset.StudyInstanceUID = SHARED_STUDY_UID
    dataset.FrameOfReferenceUID = SHARED_FRAME_UID
    dataset.BurnedInAnnotation = "NO"

    # A private block holding the patient ID and name, as some vendors do.
    block = dataset.private_block(0x0011, "HOSPITAL EXPORT", create=True)
    block.add_new(0x01, "LO", IDENTIFYING["PatientID"])
    block.add_new(0x02, "PN", PATIENT_NAME)

    # Sequences: a removed request sequence, and a kept reference carrying a nested identity.
    request = Dataset()
    request.RequestedProcedureID = "REQ-4711"
    request.ScheduledPerformingPhysicianName = "Quartermaine^Hélène"
    dataset.RequestAttributesSequence = Sequence([request])
    if referenced_sop_uid:
        reference = Dataset()
        reference.ReferencedSOPClassUID = dataset.SOPClassUID
        reference.ReferencedSOPInstanceUID = referenced_sop_uid
        reference.private_block(0x0013, "NESTED PRIVATE", create=True).add_new(
            0x01, "LO", IDENTIFYING["OtherPatientIDs"])
        reference.add_new(0x00081070, "PN", IDENTIFYING["OperatorsName"])  # Operators' Name
        dataset.ReferencedImageSequence = Sequence([reference])


@dataclass
class Case:
    source: Path
    original: Dataset
    output: Path
    result: Dataset


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    """RG1 and RG3 re-headed as two images of one study, RG3 referencing RG1, de-identified."""
    root = tmp_path_factory.mktemp("deid")
    rg1 = read_test_radiograph("RG1_UNCR.dcm")
    rg3 = read_test_radiograph("RG3_UNCR.dcm")
    _rehead(rg1, None)
    _rehead(rg3, rg1.SOPInstanceUID)
    built = {}
    for name, dataset in (("RG1", rg1), ("RG3", rg3)):
        source, output = root / f"{name}-identified.dcm", root / f"{name}-deid.dcm"
        dataset.save_as(source, enforce_file_format=True)
        original = pydicom.dcmread(source)
        result = deidentify_file(source, output, PSEUDONYMS[name], UID_KEY)
        built[name] = Case(source, original, output, result)
    return built


def _encodings(value: str) -> set[bytes]:
    encoded = {value.encode("utf-8")}
    try:
        encoded.add(value.encode("latin-1"))
    except UnicodeEncodeError:
        pass
    return encoded


@pytest.mark.parametrize("name", ["RG1", "RG3"])
def test_no_identifying_value_remains_in_the_written_bytes(cases: dict[str, Case],
                                                           name: str) -> None:
    before = cases[name].source.read_bytes()
    after = cases[name].output.read_bytes()
    original_uids = [cases[name].original.SOPInstanceUID, cases[name].original.SeriesInstanceUID,
                     SHARED_STUDY_UID, SHARED_FRAME_UID, "HOSPITAL EXPORT"]

    for value in SEARCHED + original_uids:
        assert any(encoded in before for encoded in _encodings(value)), value  # test is live
        for encoded in _encodings(value):
            assert encoded not in after, value


def test_dates_and_times_of_the_source_are_gone(cases: dict[str, Case]) -> None:
    after = cases["RG1"].output.read_bytes()

    for value in ("20040826", "19950926", "185059", "125130"):  # study, series, content
        assert value.encode() in cases["RG1"].source.read_bytes()
        assert value.encode() not in after


def test_private_attributes_are_removed_at_every_depth(cases: dict[str, Case]) -> None:
    written = pydicom.dcmread(cases["RG3"].output)

    assert not any(element.tag.is_private for element in written.iterall())
    assert "OperatorsName" not in written.ReferencedImageSequence[0]


def test_pixel_data_is_byte_identical(cases: dict[str, Case]) -> None:
    for case in cases.values():
        written = pydicom.dcmread(case.output)

        assert written.PixelData == case.original.PixelData
        assert written.Rows == case.original.Rows and written.Columns == case.original.Columns


def test_patient_characteristics_are_kept(cases: dict[str, Case]) -> None:
    written = pydicom.dcmread(cases["RG1"].output)

    for keyword, value in KEPT.items():
        assert str(written[keyword].value) == value


def test_pseudonym_replaces_name_and_id_and_birth_date_is_empty(cases: dict[str, Case]) -> None:
    written = pydicom.dcmread(cases["RG1"].output)

    assert str(written.PatientName) == PSEUDONYMS["RG1"]
    assert written.PatientID == PSEUDONYMS["RG1"]
    assert "PatientBirthDate" in written and not written.PatientBirthDate


def test_uids_are_replaced_consistently(cases: dict[str, Case]) -> None:
    rg1 = pydicom.dcmread(cases["RG1"].output)
    rg3 = pydicom.dcmread(cases["RG3"].output)

    assert rg1.StudyInstanceUID == rg3.StudyInstanceUID != SHARED_STUDY_UID
    assert rg1.FrameOfReferenceUID == rg3.FrameOfReferenceUID != SHARED_FRAME_UID
    assert rg1.SeriesInstanceUID != rg3.SeriesInstanceUID
    assert rg3.ReferencedImageSequence[0].ReferencedSOPInstanceUID == rg1.SOPInstanceUID
    assert rg1.SOPInstanceUID != cases["RG1"].original.SOPInstanceUID
    assert rg1.file_meta.MediaStorageSOPInstanceUID == rg1.SOPInstanceUID
    assert rg1.SOPClassUID == cases["RG1"].original.SOPClassUID
    for uid in (rg1.StudyInstanceUID, rg1.SeriesInstanceUID, rg1.SOPInstanceUID):
        assert UID(uid).is_valid and uid.startswith("2.25.")


def test_uid_mapping_depends_on_the_key() -> None:
    original = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"

    assert replacement_uid(original, UID_KEY) == replacement_uid(original, UID_KEY)
    assert replacement_uid(original, UID_KEY) != replacement_uid(original, b"another-key-0123456")


def test_deidentification_is_declared(cases: dict[str, Case]) -> None:
    written = pydicom.dcmread(cases["RG1"].output)

    assert written.PatientIdentityRemoved == "YES"
    assert written.DeidentificationMethod
    codes = {(item.CodeValue, item.CodingSchemeDesignator)
             for item in written.DeidentificationMethodCodeSequence}
    assert codes == {("113100", "DCM"), ("113108", "DCM")}
    assert written.file_meta.ImplementationVersionName == "OSTEO_DEID_1"
    assert written.preamble == b"\x00" * 128


def test_input_dataset_is_left_untouched(cases: dict[str, Case]) -> None:
    dataset = pydicom.dcmread(cases["RG1"].source)
    before = copy.deepcopy(dataset)

    deidentify(dataset, "P0000000000000001", UID_KEY)

    assert dataset == before
    assert str(dataset.PatientName) == PATIENT_NAME


def test_burned_in_annotation_is_refused(cases: dict[str, Case], tmp_path: Path) -> None:
    dataset = pydicom.dcmread(cases["RG1"].source)
    dataset.BurnedInAnnotation = "YES"
    source = tmp_path / "burned.dcm"
    dataset.save_as(source, enforce_file_format=True)

    with pytest.raises(BurnedInAnnotationError) as refused:
        deidentify_file(source, tmp_path / "out.dcm", "P0000000000000001", UID_KEY)

    assert refused.value.reason == "burned_in_annotation"
    assert "Müller" not in str(refused.value) and "PID-4711" not in str(refused.value)
    assert not (tmp_path / "out.dcm").exists()


def test_missing_annotation_flag_is_refused_on_risky_modalities_only(
    cases: dict[str, Case]
) -> None:
    dataset = pydicom.dcmread(cases["RG1"].source)
    del dataset.BurnedInAnnotation
    deidentify(dataset, None, UID_KEY)  # a CR without the flag is accepted
    dataset.Modality = "US"

    with pytest.raises(BurnedInAnnotationError) as refused:
        deidentify(dataset, None, UID_KEY)

    assert refused.value.reason == "burned_in_annotation_unknown"


def test_without_pseudonym_name_and_id_are_empty(cases: dict[str, Case]) -> None:
    result = deidentify(pydicom.dcmread(cases["RG1"].source), None, UID_KEY)

    assert not result.PatientName and not result.PatientID


def test_not_a_dicom_file_is_one_clear_error(tmp_path: Path) -> None:
    source = tmp_path / "IMG000001.dcm"
    source.write_bytes(b"not a dicom file at all")

    with pytest.raises(DeidentificationError, match="IMG000001.dcm: not a readable DICOM"):
        deidentify_file(source, tmp_path / "out.dcm", None, UID_KEY)


def test_action_table_applies_an_action_its_standard_code_allows() -> None:
    retained = {"PatientAge", "PatientSex", "PatientSize", "PatientWeight"}  # the option's K

    for keyword, code, action in ACTION_TABLE.values():
        allowed = set(code.replace("*", "").split("/")) | ({"K"} if keyword in retained else set())
        if action == "P":  # pseudonym: a dummy value the Z action permits
            assert code == "Z", keyword
        else:
            assert action in allowed, keyword


def test_short_uid_key_is_refused(cases: dict[str, Case]) -> None:
    with pytest.raises(ValueError, match="uid_key"):
        deidentify(pydicom.dcmread(cases["RG1"].source), None, b"short")
