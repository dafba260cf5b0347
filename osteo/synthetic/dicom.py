"""Encoding of simulated radiographs as a hospital's PACS exports them: DICOM files or 16-bit PNG.

The DICOM files carry everything a real export does, identifying attributes included (patient
name, ID, birth date, institution, physicians, operators, a private block repeating the
hospital reference), so that the pseudonymise stage is tested against a realistic file. The
clinic has three X-ray rooms (``STATIONS``): two computed radiography readers, one of which
stores MONOCHROME1 (inverted) images with a non-trivial rescale, and a direct digital room.
Bits stored are 12 or 14 in 16-bit allocation. PNG files carry pixels only, scaled to the full
16-bit range, bone bright. The mix of rooms and formats exercises ENISA control 4.26 (ensure
that the model is sufficiently resilient to the environment in which it will operate).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from osteo.synthetic.phantom import Radiograph, display_window
from osteo.synthetic.population import Patient

INSTITUTION_NAME = "Centre Hospitalier des Tilleuls"
INSTITUTION_ADDRESS = "14 allée des Tilleuls, 69008 Lyon, France"
DEPARTMENT = "Imagerie médicale"
PRIVATE_CREATOR = "CHT PATIENT FILE"
IMPLEMENTATION_VERSION = "OSTEO_SYNTH_1"
UID_SALT = "osteo synthetic clinic"
IMPLEMENTATION_UID = generate_uid(entropy_srcs=[UID_SALT, "implementation"])

REFERRING_PHYSICIANS = (
    "Dupont^Claire^^Dr", "Okafor^Nnamdi^^Dr", "Lindqvist^Åsa^^Dr", "Benali^Karim^^Dr",
    "Schmitt^Hélène^^Dr", "O'Neill^Fergus^^Dr",
)
OPERATORS = ("Moreau^Lucie", "Bakker^Joris", "Silva^Inês", "Nowak^Piotr", "Garnier^Élise")


@dataclass(frozen=True)
class Station:
    """An X-ray room of the clinic and how its system stores images.

    Attributes:
        name: DICOM StationName.
        modality: ``"CR"`` or ``"DX"``.
        manufacturer: device manufacturer.
        model: device model name.
        serial: device serial number.
        bits_stored: bits used in each 16-bit pixel.
        photometric: ``"MONOCHROME2"`` (bone bright) or ``"MONOCHROME1"`` (inverted).
        rescale_slope: RescaleSlope written (DX requires 1).
        rescale_intercept: RescaleIntercept written (DX requires 0).
        share: share of the clinic's studies done in this room.
    """

    name: str
    modality: str
    manufacturer: str
    model: str
    serial: str
    bits_stored: int
    photometric: str
    rescale_slope: float
    rescale_intercept: float
    share: float


STATIONS = (
    Station("RADIO1-CR", "CR", "Lumen Medical", "LumiCR 410", "LC410-00772", 12, "MONOCHROME2",
            1.0, -1024.0, 0.45),
    Station("RADIO2-DX", "DX", "Aster Imaging", "AsterDR 14", "ADR14-31408", 14, "MONOCHROME2",
            1.0, 0.0, 0.35),
    Station("URG-CR", "CR", "Halden Systems", "HS-CR 2", "HSCR2-0415", 12, "MONOCHROME1",
            0.5, 0.0, 0.20),
)


@dataclass(frozen=True)
class Study:
    """One patient's radiographic study: where, by whom, and its identifiers.

    Attributes:
        station: the room.
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        accession: AccessionNumber of the order.
        study_id: StudyID shown on the console.
        referring: ReferringPhysicianName (DICOM person name).
        operator: OperatorsName (the radiographer).
    """

    station: Station
    study_uid: str
    series_uid: str
    accession: str
    study_id: str
    referring: str
    operator: str


def image_uid(seed: int, image_index: int) -> str:
    """SOPInstanceUID of an image, derived from the seed so that exports are reproducible.

    Args:
        seed: the generator seed.
        image_index: position of the image in generation order.

    Returns:
        The UID.
    """
    return str(generate_uid(entropy_srcs=[UID_SALT, str(seed), "image", str(image_index)]))


def study_uids(seed: int, patient_index: int) -> tuple[str, str]:
    """StudyInstanceUID and SeriesInstanceUID of a patient's study, derived from the seed.

    Args:
        seed: the generator seed.
        patient_index: position of the patient in generation order.

    Returns:
        (study UID, series UID).
    """
    sources = [UID_SALT, str(seed), str(patient_index)]
    return (str(generate_uid(entropy_srcs=[*sources, "study"])),
            str(generate_uid(entropy_srcs=[*sources, "series"])))


def write_png(path: Path, radiograph: Radiograph) -> None:
    """Write the radiograph as a 16-bit grayscale PNG, bone bright, full 16-bit range.

    Args:
        path: destination file.
        radiograph: the simulated radiograph.
    """
    top = 2**radiograph.bits_stored - 1
    scaled = np.rint(radiograph.pixels.astype(np.float64) * (65535 / top)).astype(np.uint16)
    Image.fromarray(scaled).save(path, format="PNG")


def write_dicom(
    path: Path, radiograph: Radiograph, patient: Patient, study: Study,
    instance_number: int, sop_uid: str,
) -> None:
    """Write the radiograph as a DICOM Part 10 file (CR or DX, explicit VR little endian).

    Args:
        path: destination file.
        radiograph: the simulated radiograph (MONOCHROME2 values).
        patient: the patient, whose identifying attributes the file carries.
        study: the study the image belongs to.
        instance_number: InstanceNumber within the series.
        sop_uid: SOPInstanceUID of the image.
    """
    # 1. File meta and SOP identity.
    sop_class = (ComputedRadiographyImageStorage if study.station.modality == "CR"
                 else DigitalXRayImageStorageForPresentation)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid

    # 2. Patient, study, equipment and acquisition, then the pixels.
    _patient_attributes(ds, patient)
    _study_attributes(ds, patient, study, instance_number)
    _equipment_attributes(ds, study.station)
    _image_attributes(ds, radiograph, study.station)
    ds.save_as(path, enforce_file_format=True)


def _patient_attributes(ds: Dataset, patient: Patient) -> None:
    """Identifying and demographic attributes, as the hospital information system sends them."""
    ds.PatientName = f"{patient.last_name}^{patient.first_name}"
    ds.PatientID = patient.ref
    ds.IssuerOfPatientID = "CHT"
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{patient.age:03d}Y"
    ds.PatientSize = f"{patient.height_m:.2f}"
    ds.PatientWeight = f"{patient.weight_kg:.1f}"
    block = ds.private_block(0x0011, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", patient.ref)
    block.add_new(0x11, "LO", "Rhumatologie")


def _study_attributes(ds: Dataset, patient: Patient, study: Study, instance_number: int) -> None:
    """Study, series and instance attributes; acquisition a few minutes after the study start."""
    acquired = patient.study_at + dt.timedelta(minutes=2 * instance_number)
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = study.series_uid
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession
    ds.StudyDate = ds.SeriesDate = patient.study_at.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = patient.study_at.strftime("%H%M%S")
    ds.ContentDate = acquired.strftime("%Y%m%d")
    ds.ContentTime = acquired.strftime("%H%M%S")
    ds.AcquisitionDateTime = acquired.strftime("%Y%m%d%H%M%S")
    ds.StudyDescription = "XR LUMBAR SPINE LATERAL"
    ds.SeriesDescription = "L-SPINE LAT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.ReferringPhysicianName = study.referring
    ds.OperatorsName = study.operator
    ds.BodyPartExamined = "LSPINE"
    ds.ViewPosition = "LL"


def _equipment_attributes(ds: Dataset, station: Station) -> None:
    """Where the image was taken and with which device."""
    ds.Modality = station.modality
    ds.Manufacturer = station.manufacturer
    ds.ManufacturerModelName = station.model
    ds.DeviceSerialNumber = station.serial
    ds.StationName = station.name
    ds.InstitutionName = INSTITUTION_NAME
    ds.InstitutionAddress = INSTITUTION_ADDRESS
    ds.InstitutionalDepartmentName = DEPARTMENT
    ds.SoftwareVersions = "4.2.1"
    ds.KVP = "85"
    ds.ExposureTime = "250"
    ds.XRayTubeCurrent = "320"
    ds.DistanceSourceToDetector = "1150"


def _image_attributes(ds: Dataset, radiograph: Radiograph, station: Station) -> None:
    """Image pixel module, rescale, window and spacing, in the station's photometric convention."""
    # 1. Stored values: inverted for MONOCHROME1 stations, window moved with them.
    top = 2**radiograph.bits_stored - 1
    centre, width = display_window(radiograph)
    pixels = radiograph.pixels
    inverted = station.photometric == "MONOCHROME1"
    if inverted:
        pixels = (top - pixels.astype(np.int32)).astype(np.uint16)
        centre = top - centre

    # 2. Image pixel module.
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = station.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = radiograph.bits_stored
    ds.HighBit = radiograph.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.PatientOrientation = ["A" if radiograph.facing_right else "P", "F"]
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if inverted else -1
    if station.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"

    # 3. Rescale, window (in rescaled units) and spacing.
    slope, intercept = station.rescale_slope, station.rescale_intercept
    ds.RescaleSlope = _ds(slope)
    ds.RescaleIntercept = _ds(intercept)
    ds.RescaleType = "US"
    ds.WindowCenter = _ds(centre * slope + intercept)
    ds.WindowWidth = _ds(width * slope)
    spacing = _ds(radiograph.pixel_spacing_mm)
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelData = pixels.astype("<u2").tobytes()


def _ds(value: float) -> str:
    """Format a number as a DICOM decimal string (at most 16 characters)."""
    return f"{value:.6g}"
