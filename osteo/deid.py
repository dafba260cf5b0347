"""DICOM de-identification: the PS3.15 Annex E Basic Profile, Retain Patient Characteristics.

Implements the DICOM side of ENISA control 4.15, "pseudonymise data coming from the historical
patient": before a radiograph leaves the practice's identifiable zone, every attribute that
could identify the patient, the staff or the institution is removed, emptied or replaced,
following the Basic Application Level Confidentiality Profile (PS3.15 Annex E, Table E.1-1)
with the Retain Patient Characteristics Option. Reads a ``pydicom.Dataset`` (or a DICOM file)
and returns (or writes) a new one; the input is left untouched.

What happens to an attribute, in this order:

1. ``ACTION_TABLE`` gives, for the Table E.1-1 attributes a CR or DX export can carry, the
   standard's action code and the action applied. Conditional codes are resolved for the CR
   and DX image IODs: X/Z/D, X/D and X/Z become X (Type 3 there), Z/D becomes Z (Type 2 or 2C).
   X/Z/U* reference sequences (Referenced Image, Source Image) are kept with every instance
   UID inside replaced, rather than removed, so that references between images survive.
2. Patient's Name and Patient ID (Z) get the pseudonym when one is given, else zero length.
3. Retain Patient Characteristics: Patient's Age, Sex, Size and Weight are kept. The other
   characteristics the option allows to keep (ethnic group, allergies, smoking status, ...) are
   removed: osteo needs only these four (data minimisation).
4. Attributes outside the table: private attributes, curves (50xx) and overlays (60xx, which
   may draw text) are removed; so are person names (PN) and dates and times (DA, DT, TM), by
   value representation, as Table E.1-1's note on extensibility suggests; sequences are walked
   and the same rules applied to every item at every depth; everything else is kept.
5. UIDs (U) are replaced by ``2.25.<n>`` UIDs derived from an HMAC-SHA256 of the original under
   ``uid_key``: the same original gives the same replacement under one key (two images of one
   study keep one shared Study Instance UID) and nobody without the key can link them back.
6. Patient Identity Removed is set to YES, De-identification Method and its code sequence
   (DCM 113100 Basic Application Confidentiality Profile, 113108 Retain Patient
   Characteristics Option) are added, and Longitudinal Temporal Information Modified is set to
   REMOVED. The File Meta Information is rewritten to describe this de-identifier and the
   preamble is zeroed.

Dates follow the profile (Study Date and Time emptied, the others removed). The Retain
Longitudinal Temporal Information options (keep or shift dates) are not implemented.

Images whose pixels may show text are refused with ``BurnedInAnnotationError`` so the caller
can quarantine them: Burned In Annotation = YES, or the attribute missing on a modality or SOP
class where burned-in text is common (ultrasound, secondary capture, scanned documents, ...).
A CR or DX image without the attribute is accepted: their detectors do not write text into
the pixels.
Limitation: the Clean Pixel Data option is not implemented, so a film digitised as CR with a
printed name label and no Burned In Annotation attribute would pass; pixel data is copied
unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import logging
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

logger = logging.getLogger(__name__)

MIN_UID_KEY_BYTES = 16
PSEUDONYM_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
IMPLEMENTATION_UID = UID(f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'osteo:deid').int}")
IMPLEMENTATION_VERSION = "OSTEO_DEID_1"
METHOD = "PS3.15 E.1 Basic Profile, Retain Patient Characteristics"
METHOD_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113108", "Retain Patient Characteristics Option"),
)

# Modalities and SOP classes where text burned into the pixels is common.
BURNED_IN_RISK_MODALITIES = frozenset({"US", "OT", "SC", "XC", "ES", "GM", "SM", "DOC"})
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its .1 to .4 multi-frame classes


class DeidentificationError(Exception):
    """A dataset cannot be de-identified; the message names the file, never patient data."""


class BurnedInAnnotationError(DeidentificationError):
    """The pixels may show identifying text; quarantine the image with ``reason``.

    Attributes:
        reason: quarantine reason code, ``burned_in_annotation`` when the image declares it,
            ``burned_in_annotation_unknown`` when a risky image does not say.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------- the action table

# keyword: (Table E.1-1 Basic Profile code, action applied for CR and DX).
# Applied actions: X remove, Z zero length, D dummy value, U replace UID (for a sequence: keep
# and replace the UIDs inside), K keep (Retain Patient Characteristics), P pseudonym or Z.
_ACTIONS: dict[str, tuple[str, str]] = {
    # Patient
    "PatientName": ("Z", "P"),
    "PatientID": ("Z", "P"),
    "PatientBirthDate": ("Z", "Z"),
    "PatientBirthTime": ("X", "X"),
    "PatientSex": ("Z", "K"),
    "PatientAge": ("X", "K"),
    "PatientSize": ("X", "K"),
    "PatientWeight": ("X", "K"),
    "OtherPatientIDs": ("X", "X"),
    "OtherPatientIDsSequence": ("X", "X"),
    "OtherPatientNames": ("X", "X"),
    "PatientBirthName": ("X", "X"),
    "PatientMotherBirthName": ("X", "X"),
    "PatientAddress": ("X", "X"),
    "PatientTelephoneNumbers": ("X", "X"),
    "PatientTelecomInformation": ("X", "X"),
    "PatientComments": ("X", "X"),
    "IssuerOfPatientID": ("X", "X"),
    "MedicalRecordLocator": ("X", "X"),
    "MilitaryRank": ("X", "X"),
    "BranchOfService": ("X", "X"),
    "CountryOfResidence": ("X", "X"),
    "RegionOfResidence": ("X", "X"),
    "Occupation": ("X", "X"),
    "EthnicGroup": ("X", "X"),
    "AdditionalPatientHistory": ("X", "X"),
    "Allergies": ("X", "X"),
    "MedicalAlerts": ("X", "X"),
    "PregnancyStatus": ("X", "X"),
    "SmokingStatus": ("X", "X"),
    "PatientReligiousPreference": ("X", "X"),
    "PatientInsurancePlanCodeSequence": ("X", "X"),
    "PatientPrimaryLanguageCodeSequence": ("X", "X"),
    "ResponsiblePerson": ("X", "X"),
    "ResponsibleOrganization": ("X", "X"),
    "PatientState": ("X", "X"),
    "PatientSexNeutered": ("X/Z", "X"),
    "ReferencedPatientSequence": ("X", "X"),
    "ReferencedPatientPhotoSequence": ("X", "X"),
    "PatientBirthDateInAlternativeCalendar": ("X", "X"),
    "PatientDeathDateInAlternativeCalendar": ("X", "X"),
    "PatientAlternativeCalendar": ("X", "X"),
    "PersonName": ("D", "D"),
    "PersonAddress": ("X", "X"),
    "PersonTelephoneNumbers": ("X", "X"),
    # Study and request
    "StudyInstanceUID": ("U", "U"),
    "StudyDate": ("Z", "Z"),
    "StudyTime": ("Z", "Z"),
    "AccessionNumber": ("Z", "Z"),
    "IssuerOfAccessionNumberSequence": ("X", "X"),
    "StudyID": ("Z", "Z"),
    "StudyDescription": ("X", "X"),
    "StudyComments": ("X", "X"),
    "ReferringPhysicianName": ("Z", "Z"),
    "ReferringPhysicianAddress": ("X", "X"),
    "ReferringPhysicianTelephoneNumbers": ("X", "X"),
    "ReferringPhysicianIdentificationSequence": ("X", "X"),
    "PhysiciansOfRecord": ("X", "X"),
    "PhysiciansOfRecordIdentificationSequence": ("X", "X"),
    "NameOfPhysiciansReadingStudy": ("X", "X"),
    "PhysiciansReadingStudyIdentificationSequence": ("X", "X"),
    "RequestingPhysician": ("X", "X"),
    "RequestingService": ("X/Z", "X"),
    "AdmittingDiagnosesDescription": ("X", "X"),
    "AdmittingDiagnosesCodeSequence": ("X", "X"),
    "AdmissionID": ("X", "X"),
    "ReasonForStudy": ("X", "X"),
    "RequestedProcedureDescription": ("X/Z", "X"),
    "RequestedProcedureID": ("X", "X"),
    "RequestedProcedureComments": ("X", "X"),
    "ImagingServiceRequestComments": ("X", "X"),
    "OrderEnteredBy": ("X", "X"),
    "OrderEntererLocation": ("X", "X"),
    "OrderCallbackPhoneNumber": ("X", "X"),
    "ReferencedStudySequence": ("X/Z", "X"),
    "CurrentPatientLocation": ("X", "X"),
    "ServiceEpisodeID": ("X", "X"),
    "VisitComments": ("X", "X"),
    # Series and procedure step
    "SeriesInstanceUID": ("U", "U"),
    "SeriesDate": ("X/D", "X"),
    "SeriesTime": ("X/D", "X"),
    "SeriesDescription": ("X", "X"),
    "ProtocolName": ("X/D", "X"),
    "OperatorsName": ("X/Z/D", "X"),
    "OperatorIdentificationSequence": ("X/D", "X"),
    "PerformingPhysicianName": ("X", "X"),
    "PerformingPhysicianIdentificationSequence": ("X", "X"),
    "ScheduledPerformingPhysicianName": ("X", "X"),
    "PerformedProcedureStepID": ("X", "X"),
    "PerformedProcedureStepStartDate": ("X", "X"),
    "PerformedProcedureStepStartTime": ("X", "X"),
    "PerformedProcedureStepEndDate": ("X", "X"),
    "PerformedProcedureStepEndTime": ("X", "X"),
    "PerformedProcedureStepDescription": ("X", "X"),
    "CommentsOnThePerformedProcedureStep": ("X", "X"),
    "PerformedStationName": ("X", "X"),
    "PerformedStationAETitle": ("X", "X"),
    "PerformedLocation": ("X", "X"),
    "RequestAttributesSequence": ("X", "X"),
    "ScheduledProcedureStepID": ("X", "X"),
    "ReferencedPerformedProcedureStepSequence": ("X/Z/D", "X"),
    # Equipment
    "InstitutionName": ("X/Z/D", "X"),
    "InstitutionAddress": ("X", "X"),
    "InstitutionCodeSequence": ("X/Z/D", "X"),
    "InstitutionalDepartmentName": ("X", "X"),
    "InstitutionalDepartmentTypeCodeSequence": ("X", "X"),
    "StationName": ("X/Z/D", "X"),
    "DeviceSerialNumber": ("X/Z/D", "X"),
    "DeviceUID": ("U", "U"),
    "DetectorID": ("X/D", "X"),
    "PlateID": ("X", "X"),
    "CassetteID": ("X", "X"),
    "DateOfLastCalibration": ("X", "X"),
    "TimeOfLastCalibration": ("X", "X"),
    "DateOfLastDetectorCalibration": ("X", "X"),
    "TimeOfLastDetectorCalibration": ("X", "X"),
    # Image and instance
    "SOPInstanceUID": ("U", "U"),
    "InstanceCreatorUID": ("U", "U"),
    "InstanceCreationDate": ("X/D", "X"),
    "InstanceCreationTime": ("X/Z/D", "X"),
    "ContentDate": ("Z/D", "Z"),
    "ContentTime": ("Z/D", "Z"),
    "AcquisitionDate": ("X/Z", "X"),
    "AcquisitionTime": ("X/Z", "X"),
    "AcquisitionDateTime": ("X/Z/D", "X"),
    "AcquisitionComments": ("X", "X"),
    "AcquisitionDeviceProcessingDescription": ("X/D", "X"),
    "ImageComments": ("X", "X"),
    "FrameComments": ("X", "X"),
    "DerivationDescription": ("X", "X"),
    "TimezoneOffsetFromUTC": ("X", "X"),
    "ContentCreatorName": ("Z", "Z"),
    "ContentSequence": ("X", "X"),
    "FrameOfReferenceUID": ("U", "U"),
    "SynchronizationFrameOfReferenceUID": ("U", "U"),
    "IrradiationEventUID": ("U", "U"),
    "ConcatenationUID": ("U", "U"),
    "DimensionOrganizationUID": ("U", "U"),
    "ReferencedSOPInstanceUID": ("U", "U"),
    "ReferencedFrameOfReferenceUID": ("U", "U"),
    "StorageMediaFileSetUID": ("U", "U"),
    "ReferencedImageSequence": ("X/Z/U*", "U"),
    "SourceImageSequence": ("X/Z/U*", "U"),
    # Security and padding
    "DigitalSignaturesSequence": ("X", "X"),
    "MACParametersSequence": ("X", "X"),
    "OriginalAttributesSequence": ("X", "X"),
    "ModifiedAttributesSequence": ("X", "X"),
    "DataSetTrailingPadding": ("X", "X"),
}


def _table() -> dict[BaseTag, tuple[str, str, str]]:
    table = {}
    for keyword, (code, action) in _ACTIONS.items():
        tag = tag_for_keyword(keyword)
        if tag is None:  # a typo here must fail at import, not leak silently
            raise RuntimeError(f"unknown DICOM keyword in the action table: {keyword}")
        table[Tag(tag)] = (keyword, code, action)
    return table


ACTION_TABLE: dict[BaseTag, tuple[str, str, str]] = _table()
"""Tag -> (keyword, Table E.1-1 Basic Profile code, action applied)."""

_REMOVED_BY_VR = frozenset({"PN", "DA", "DT", "TM"})
_DUMMY_BY_VR = {"PN": "ANONYMOUS", "DA": "19000101", "TM": "000000", "DT": "19000101000000",
                "IS": "0", "DS": "0", "AS": "000Y"}


# ---------------------------------------------------------------- UIDs


def replacement_uid(original: str, uid_key: bytes) -> str:
    """The replacement of a UID under ``uid_key``: same input, same output; not reversible.

    The HMAC-SHA256 of the original is shaped as a version 8 (custom) UUID and written as a
    ``2.25`` UID (PS3.5 B.2), at most 44 characters.

    Args:
        original: the UID to replace.
        uid_key: secret key of the mapping (at least 16 bytes).

    Returns:
        The replacement UID.
    """
    digest = hmac.new(uid_key, b"osteo.deid.uid:" + original.encode("ascii"),
                      hashlib.sha256).digest()
    value = int.from_bytes(digest[:16], "big")
    value = (value & ~(0xF << 76)) | (0x8 << 76)  # version 8
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 9562 variant
    return f"2.25.{value}"


def _map_uids(element: DataElement, uid_key: bytes) -> None:
    if element.VR != "UI" or element.value in (None, ""):
        return
    if element.VM > 1:
        element.value = [replacement_uid(str(uid), uid_key) for uid in element.value]
    else:
        element.value = replacement_uid(str(element.value), uid_key)


# ---------------------------------------------------------------- the walk


def _default_action(element: DataElement) -> str:
    """Action for an attribute outside the table (step 4 of the module docstring)."""
    group = element.tag.group
    if element.tag.is_private or 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:
        return "X"
    if element.VR in _REMOVED_BY_VR:
        return "X"
    return "K"


def _dummy(element: DataElement) -> Any:
    if element.VR == "SQ":
        return Sequence([])
    return _DUMMY_BY_VR.get(element.VR, "ANONYMIZED")


def _clean(dataset: Dataset, uid_key: bytes, pseudonym: str | None) -> None:
    """Apply the action table to ``dataset`` and, recursively, to every sequence item."""
    for tag in list(dataset.keys()):
        element = dataset[tag]
        rule = ACTION_TABLE.get(Tag(tag))
        action = rule[2] if rule else _default_action(element)
        if action == "U" and element.VR not in {"UI", "SQ"}:
            action = "X"  # an unknown-VR (UN) UID cannot be remapped safely
        _APPLY[action](dataset, element, uid_key, pseudonym)


def _remove(dataset: Dataset, element: DataElement, *_: Any) -> None:
    del dataset[element.tag]


def _empty(dataset: Dataset, element: DataElement, *_: Any) -> None:
    element.value = Sequence([]) if element.VR == "SQ" else None


def _dummy_value(dataset: Dataset, element: DataElement, *_: Any) -> None:
    element.value = _dummy(element)


def _replace_uid(dataset: Dataset, element: DataElement, uid_key: bytes,
                 pseudonym: str | None) -> None:
    if element.VR == "SQ":
        for item in element.value:
            _clean(item, uid_key, pseudonym)
    else:
        _map_uids(element, uid_key)


def _keep(dataset: Dataset, element: DataElement, uid_key: bytes, pseudonym: str | None) -> None:
    if element.VR == "SQ":
        for item in element.value:
            _clean(item, uid_key, pseudonym)


def _pseudonymise(dataset: Dataset, element: DataElement, _key: bytes,
                  pseudonym: str | None) -> None:
    element.value = pseudonym or None


_APPLY: dict[str, Callable[[Dataset, DataElement, bytes, str | None], None]] = {
    "X": _remove, "Z": _empty, "D": _dummy_value, "U": _replace_uid, "K": _keep,
    "P": _pseudonymise,
}


# ---------------------------------------------------------------- public API


def check_burned_in_annotation(dataset: Dataset) -> None:
    """Refuse an image whose pixels may show identifying text.

    Raises:
        BurnedInAnnotationError: Burned In Annotation is YES, or missing on a modality or SOP
            class where burned-in text is common.
    """
    check_burned_in_values(str(dataset.get("BurnedInAnnotation", "") or ""),
                           str(dataset.get("Modality", "") or ""),
                           str(dataset.get("SOPClassUID", "") or ""))


def check_burned_in_values(burned_in_annotation: str, modality: str, sop_class: str) -> None:
    """``check_burned_in_annotation`` on header values already read (empty when absent).

    Raises:
        BurnedInAnnotationError: as ``check_burned_in_annotation``.
    """
    declared = burned_in_annotation.strip().upper()
    if declared == "YES":
        raise BurnedInAnnotationError(
            "the image declares burned-in annotation (Burned In Annotation = YES)",
            reason="burned_in_annotation",
        )
    modality = modality.upper()
    secondary_capture = sop_class == SECONDARY_CAPTURE or sop_class.startswith(
        SECONDARY_CAPTURE + ".")
    risky = modality in BURNED_IN_RISK_MODALITIES or secondary_capture
    if not declared and risky:
        raise BurnedInAnnotationError(
            f"Burned In Annotation is missing on a {modality or 'secondary capture'} image, "
            f"where burned-in text is common",
            reason="burned_in_annotation_unknown",
        )


def deidentify(dataset: Dataset, pseudonym: str | None, uid_key: bytes) -> Dataset:
    """Return a de-identified copy of ``dataset`` (the input is left untouched).

    Args:
        dataset: the DICOM dataset, with or without File Meta Information.
        pseudonym: written as Patient's Name and Patient ID (e.g. ``P0123456789abcdef``);
            None or "" leaves both zero length.
        uid_key: secret key of the UID mapping, at least 16 bytes; keep it with the identity
            vault to re-derive the same UIDs.

    Returns:
        The de-identified dataset.

    Raises:
        BurnedInAnnotationError: when the pixels may show identifying text.
        DeidentificationError: when the dataset has no SOP Instance UID.
        ValueError: when the pseudonym is not a short identifier or the key is too short.
    """
    if pseudonym and not PSEUDONYM_PATTERN.fullmatch(pseudonym):
        raise ValueError("pseudonym must be 1-64 letters, digits, '_', '.' or '-'")
    if len(uid_key) < MIN_UID_KEY_BYTES:
        raise ValueError(f"uid_key must be at least {MIN_UID_KEY_BYTES} bytes")

    # 1. Refuse images that may show text, or that no UID identifies, before copying anything.
    check_burned_in_annotation(dataset)
    if not dataset.get("SOPInstanceUID"):
        raise DeidentificationError("the dataset has no SOP Instance UID")

    # 2. Walk a copy: table actions, pseudonym, UIDs, defaults for everything else.
    result = copy.deepcopy(dataset)
    _clean(result, uid_key, pseudonym)
    result.PatientName = pseudonym or None
    result.PatientID = pseudonym or None

    # 3. Say what was done, in the standard's terms.
    result.PatientIdentityRemoved = "YES"
    result.DeidentificationMethod = METHOD
    result.DeidentificationMethodCodeSequence = Sequence([
        _code(value, meaning) for value, meaning in METHOD_CODES
    ])
    result.LongitudinalTemporalInformationModified = "REMOVED"

    # 4. File Meta Information and preamble describe this de-identifier, nothing else.
    _rewrite_file_meta(result)
    return result


def deidentify_file(src: Path | str, dst: Path | str, pseudonym: str | None,
                    uid_key: bytes) -> Dataset:
    """De-identify the DICOM file ``src`` into ``dst`` (written atomically).

    Args:
        src: the identifiable DICOM file.
        dst: where to write the de-identified file; its directory is created.
        pseudonym: see ``deidentify``.
        uid_key: see ``deidentify``.

    Returns:
        The de-identified dataset as written.

    Raises:
        DeidentificationError: when ``src`` is not a readable DICOM file.
        BurnedInAnnotationError: when the pixels may show identifying text.
    """
    src, dst = Path(src), Path(dst)
    try:
        dataset = pydicom.dcmread(src)
    except (InvalidDicomError, EOFError, OSError) as error:
        raise DeidentificationError(f"{src.name}: not a readable DICOM file") from error
    result = deidentify(dataset, pseudonym, uid_key)

    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(dst.name + ".partial")
    result.save_as(partial, enforce_file_format=True)
    os.replace(partial, dst)
    logger.debug("de-identified %s -> %s", src.name, dst.name)
    return result


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def _rewrite_file_meta(dataset: Dataset) -> None:
    if hasattr(dataset, "preamble"):
        dataset.preamble = b"\x00" * 128
    meta = getattr(dataset, "file_meta", None)
    if meta is None:
        return
    clean = FileMetaDataset()
    clean.MediaStorageSOPClassUID = dataset.get("SOPClassUID", meta.get("MediaStorageSOPClassUID"))
    clean.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    clean.TransferSyntaxUID = meta.TransferSyntaxUID
    clean.ImplementationClassUID = IMPLEMENTATION_UID
    clean.ImplementationVersionName = IMPLEMENTATION_VERSION
    dataset.file_meta = clean
