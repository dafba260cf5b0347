"""One radiograph's pixels: stored values decoded once, display attributes, image statistics.

The ingest stage reads every export file once; while its bytes are in memory it decodes the
stored pixel values with the functions here, measures them (``image_statistics``), turns them
into the model's input (``tasks.preprocess.to_model_input``) and keeps only what later stages
need: the model input, the display attributes of the DICOM header (modality, photometric
interpretation, bits stored, rescale, window, rows and columns) and the statistics. No
identifying attribute of the header leaves this module.

Statistics are cheap by design. Extremes (minimum, maximum, bits used) come from every pixel;
mean, spread, percentiles, saturation shares and texture from a strided subsample of about
16 000 pixels (``np.partition``, no sort), so they cost well under a millisecond for a
512 x 416 image and a few for a 2500 x 2000 one. ``*_norm`` statistics are fractions of the
stored range ``2**bits_stored - 1`` in the MONOCHROME2 convention (bright = bone), so
MONOCHROME1 images compare with the others. The validate stage judges them against the
``images`` expectation suite (control 4.9). Pixels whose stored value the header declares as
padding (Pixel Padding Value, with Pixel Padding Range Limit) are not image: they are left out
of every statistic but the shape, and an image made only of padding is blank.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.datadict import dictionary_VR
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

DISPLAY_FLOATS = ("rescale_slope", "rescale_intercept", "window_center", "window_width")
ATTRIBUTE_COLUMNS = ("modality", "photometric", "bits_stored", *DISPLAY_FLOATS, "rows",
                     "columns")
STAT_COLUMNS = (
    "height", "width", "min_side", "aspect", "stored_min", "stored_max", "bits_used",
    "pixel_min", "pixel_max", "pixel_mean", "pixel_std", "pixel_p01", "pixel_p99",
    "frac_at_min", "frac_at_max", "frac_dark", "frac_bright",
    "mean_norm", "std_norm", "p01_norm", "p99_norm", "dynamic_range", "texture",
)
SAMPLE_PIXELS = 16_384  # pixels of the strided subsample: moments, percentiles, texture
PNG_MODES = ("L", "I;16", "I;16B", "I;16L")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_NATIVE_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_DICOM_FLOAT_TAGS = {
    "rescale_slope": "RescaleSlope", "rescale_intercept": "RescaleIntercept",
    "window_center": "WindowCenter", "window_width": "WindowWidth",
}
# Without a rescale (nor a Modality LUT Sequence, which ingest refuses) the stored values are
# the modality values (PS3.3 C.11.1): the identity. Many CR headers leave the rescale out, and
# a PNG has none. A window has no such default.
IDENTITY_RESCALE = {"rescale_slope": 1.0, "rescale_intercept": 0.0}


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
    padding: np.ndarray | None = None  # True where a pixel is padding, not image (DICOM only)


# ---------------------------------------------------------------- decoding


@dataclass(frozen=True)
class DicomHeader:
    """The header attributes that checking and decoding a DICOM radiograph need, read once.

    None of them identifies anyone. Defaults of the standard are applied (one sample per
    pixel, one frame, unsigned values); ``pixel_data_bytes`` is None when the file has no Pixel
    Data element.
    """

    transfer_syntax: pydicom.uid.UID | None
    photometric: str
    samples_per_pixel: int
    bits_allocated: int | None
    bits_stored: int | None
    high_bit: int | None
    pixel_representation: int
    frames: int
    rows: int | None
    columns: int | None
    modality: str | None
    display: dict[str, float | None]  # rescale slope and intercept, window centre and width
    pixel_data_bytes: int | None
    burned_in_annotation: str
    sop_class: str
    modality_lut: bool  # a Modality LUT Sequence, which replaces the rescale
    padding: tuple[int, int] | None = None  # stored values that are padding, both ends included


def read_dicom(data: bytes) -> tuple[pydicom.Dataset, DicomHeader]:
    """Parse a DICOM file and convert the header values its checks and decoding need.

    pydicom converts a value only when it is first read, so a value it cannot convert (an
    unsigned short of three bytes, an integer string that is no number) would otherwise fail
    halfway through the checks, outside any rejection. Here it makes the file unreadable.

    Args:
        data: the file's bytes.

    Returns:
        The parsed dataset, Pixel Data included, and its header values.

    Raises:
        DecodeError: ``unreadable_dicom``, when the bytes are not DICOM or a needed value cannot
            be converted; the detail names the attribute, never its value.
    """
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except Exception as error:  # noqa: BLE001 - any parse failure of untrusted bytes is "unreadable"
        raise DecodeError("unreadable_dicom",
                          f"not a readable DICOM file ({type(error).__name__})") from None
    header = DicomHeader(
        transfer_syntax=header_value(dataset.file_meta, "TransferSyntaxUID"),
        photometric=str(header_value(dataset, "PhotometricInterpretation") or ""),
        samples_per_pixel=_integer_or(dataset, "SamplesPerPixel", 1),
        bits_allocated=_integer(dataset, "BitsAllocated"),
        bits_stored=_integer(dataset, "BitsStored"),
        high_bit=_integer(dataset, "HighBit"),
        pixel_representation=_integer_or(dataset, "PixelRepresentation", 0),
        frames=_integer(dataset, "NumberOfFrames") or 1,  # 0 in some single-frame exports
        rows=_integer(dataset, "Rows"),
        columns=_integer(dataset, "Columns"),
        modality=str(header_value(dataset, "Modality") or "") or None,
        display={column: _display_value(dataset, keyword, IDENTITY_RESCALE.get(column))
                 for column, keyword in _DICOM_FLOAT_TAGS.items()},
        pixel_data_bytes=(len(header_value(dataset, "PixelData") or b"")
                          if "PixelData" in dataset else None),
        burned_in_annotation=str(header_value(dataset, "BurnedInAnnotation") or ""),
        sop_class=str(header_value(dataset, "SOPClassUID") or ""),
        modality_lut="ModalityLUTSequence" in dataset,
        padding=_padding_values(dataset),
    )
    return dataset, header


def header_value(dataset: pydicom.Dataset, keyword: str) -> Any:
    """A header value as pydicom converts it, or None when absent.

    Reading a value through this function is safe on untrusted files; ``read_dicom`` reads
    every value this module needs through it.

    Raises:
        DecodeError: ``unreadable_dicom`` when pydicom cannot convert the stored bytes.
    """
    try:
        return dataset.get(keyword)
    except Exception:  # noqa: BLE001 - pydicom raises several types on malformed values
        raise _malformed(keyword) from None


def _integer(dataset: pydicom.Dataset, keyword: str) -> int | None:
    """A header value that must be one integer; None when absent or empty."""
    value = header_value(dataset, keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _malformed(keyword) from None


def _integer_or(dataset: pydicom.Dataset, keyword: str, default: int) -> int:
    """``_integer``, with the standard's default for an absent value."""
    value = _integer(dataset, keyword)
    return default if value is None else value


def _display_value(dataset: pydicom.Dataset, keyword: str, default: float | None) -> float | None:
    """A rescale or window value; ``default`` when absent, None when it is not a number."""
    value = header_value(dataset, keyword)
    if value is None or value == "":
        return default
    return _first_float(value)


def _padding_values(dataset: pydicom.Dataset) -> tuple[int, int] | None:
    """The stored values that pad the image rather than show anything, or None.

    PS3.3 C.7.5.1.1.2: Pixel Padding Value alone names one value; with Pixel Padding Range
    Limit, every value between the two (both included) is padding: the area outside a round or
    tilted field, for instance, which holds no image.
    """
    value = _integer(dataset, "PixelPaddingValue")
    if value is None:
        return None
    limit = _integer(dataset, "PixelPaddingRangeLimit")
    return (value, value) if limit is None else (min(value, limit), max(value, limit))


def _malformed(keyword: str) -> DecodeError:
    tag = Tag(keyword)
    return DecodeError("unreadable_dicom", f"DICOM attribute {keyword} {tag} has a value that "
                                           f"cannot be read as {dictionary_VR(tag)}")


def decode_dicom(dataset: pydicom.Dataset, header: DicomHeader) -> Decoded:
    """Decode a parsed DICOM radiograph's stored values, keeping only display attributes.

    Args:
        dataset: the parsed file, Pixel Data included.
        header: its header values (``read_dicom``).

    Returns:
        Stored values as uint16; modality, photometric, bits_stored, rescale and window
        attributes, rows and columns; and where the header declares padding values, the mask of
        the pixels that hold one.

    Raises:
        DecodeError: when the values are signed and negative, or not a single 2-D frame;
            ``image_blank`` when every pixel is padding.
        Exception: whatever pydicom's pixel decoders raise on data they cannot decode.
    """
    pixels = _stored_values(dataset, header)
    if pixels.ndim != 2:
        raise DecodeError("unsupported_image", f"pixel array has {pixels.ndim} dimensions, not 2")
    if pixels.dtype.kind == "i":
        if pixels.size and pixels.min() < 0:
            raise DecodeError("unsupported_image", "signed pixel values below zero")
        pixels = pixels.astype(np.uint16)
    attributes: dict[str, Any] = {
        "modality": header.modality, "photometric": header.photometric,
        "bits_stored": header.bits_stored or header.bits_allocated,
        "rows": int(pixels.shape[0]), "columns": int(pixels.shape[1]), **header.display,
    }
    pixels = pixels.astype(np.uint16, copy=False)
    return Decoded(pixels, attributes, _padding_mask(pixels, header.padding))


def _padding_mask(pixels: np.ndarray, padding: tuple[int, int] | None) -> np.ndarray | None:
    """Where the pixels hold a padding value; None when none does.

    Raises:
        DecodeError: ``image_blank`` when every pixel is padding.
    """
    if padding is None:
        return None
    low, high = padding
    mask = (pixels == low) if low == high else ((pixels >= low) & (pixels <= high))
    if not mask.any():
        return None
    if mask.all():
        raise DecodeError("image_blank", "every pixel holds the Pixel Padding Value: no image")
    return mask


def _stored_values(dataset: pydicom.Dataset, header: DicomHeader) -> np.ndarray:
    """Stored values; uncompressed unsigned 16-bit data is viewed in place, not converted."""
    bits_stored = header.bits_stored or 16
    rows, columns = header.rows or 0, header.columns or 0
    fast = (
        header.transfer_syntax in _NATIVE_LITTLE_ENDIAN and header.bits_allocated == 16
        and header.pixel_representation == 0 and header.samples_per_pixel == 1
        and header.frames == 1 and rows > 0 and columns > 0
        and (header.high_bit is None or header.high_bit == bits_stored - 1)
    )
    if not fast:
        pixels: np.ndarray = dataset.pixel_array
        return pixels
    if (header.pixel_data_bytes or 0) < rows * columns * 2:
        raise DecodeError("undecodable_pixels", "Pixel Data is shorter than rows x columns")
    pixels = np.frombuffer(dataset.PixelData, dtype="<u2", count=rows * columns)
    pixels = pixels.reshape(rows, columns)
    if bits_stored < 16:
        pixels = pixels & np.uint16((1 << bits_stored) - 1)  # unused high bits are not pixel data
    return pixels


def decode_png(data: bytes) -> Decoded:
    """Decode a grayscale PNG (8 or 16 bits); PNG grayscale is bright-is-high (MONOCHROME2).

    Args:
        data: the file's bytes.

    Returns:
        Values as uint16; bits_stored from the sBIT chunk when there is one, else the bit
        depth; the identity rescale; no modality or window.

    Raises:
        DecodeError: when the PNG is not 8- or 16-bit grayscale.
        Exception: whatever Pillow raises on a PNG it cannot decode.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        mode = image.mode
        pixels = np.asarray(image)
    if mode not in PNG_MODES:
        raise DecodeError("unsupported_image", f"PNG mode {mode} is not 8- or 16-bit grayscale")
    # A PNG carries no modality or window: they stay null, and the rescale is the identity.
    depth = 8 if mode == "L" else 16
    attributes: dict[str, Any] = {
        "modality": None, "photometric": "MONOCHROME2",
        "bits_stored": _significant_bits(data, depth),
        "rows": int(pixels.shape[0]), "columns": int(pixels.shape[1]),
    }
    attributes |= dict.fromkeys(DISPLAY_FLOATS) | IDENTITY_RESCALE
    return Decoded(pixels.astype(np.uint16, copy=False), attributes)


def _significant_bits(data: bytes, depth: int) -> int:
    """The bits per value a grayscale PNG declares significant (its sBIT chunk), else its depth.

    A 12-bit detector's values in a 16-bit PNG use 12 bits; without sBIT they are read as 16,
    and the validate stage finds them implausibly dark.
    """
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"IDAT":  # sBIT must come before the image data
            break
        if kind == b"sBIT" and length >= 1 and position + 9 <= len(data):
            bits = data[position + 8]
            return bits if 1 <= bits <= depth else depth
        position += 12 + length
    return depth


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


# ---------------------------------------------------------------- statistics


@dataclass(frozen=True)
class PixelEncoding:
    """How a record says its stored pixel values are to be read."""

    bits_stored: int = 16
    slope: float = 1.0
    intercept: float = 0.0
    monochrome1: bool = False

    @property
    def full_scale(self) -> float:
        return float(2**self.bits_stored - 1)

    @classmethod
    def of(cls, attributes: dict[str, Any]) -> PixelEncoding:
        """The encoding a record's attributes describe, with safe defaults for unusable ones.

        Records with unusable attributes are quarantined by the validate stage; the defaults
        only let their statistics be computed without error.
        """
        bits = _finite(attributes.get("bits_stored"))
        slope = _finite(attributes.get("rescale_slope"))
        intercept = _finite(attributes.get("rescale_intercept"))
        return cls(
            bits_stored=int(bits) if bits is not None and 1 <= bits <= 16 else 16,
            slope=slope if slope else 1.0,
            intercept=intercept or 0.0,
            monochrome1=attributes.get("photometric") == "MONOCHROME1",
        )


def _finite(value: Any) -> float | None:
    """A number as a float, or None when it is missing, NaN or not a number."""
    if not isinstance(value, int | float | np.number) or not math.isfinite(value):
        return None
    return float(value)


def _subsample(pixels: np.ndarray) -> np.ndarray:
    """A strided view keeping about ``SAMPLE_PIXELS`` pixels spread over the whole image."""
    # Limitation: a regular grid can alias with periodic patterns (anti-scatter grid lines),
    # biasing percentiles and texture slightly on such images; extremes are exact regardless.
    step = max(1, math.ceil(math.sqrt(pixels.size / SAMPLE_PIXELS)))
    return pixels[::step, ::step]


def image_statistics(
    pixels: np.ndarray, encoding: PixelEncoding, padding: np.ndarray | None = None,
) -> dict[str, float]:
    """Compute the statistics of one radiograph, cheaply.

    Args:
        pixels: 2-D array of raw stored values (unsigned integers, not empty).
        encoding: bits stored, rescale slope and intercept, photometric interpretation.
        padding: True where a pixel is padding (``Decoded.padding``), not all of them; such
            pixels are left out of every figure but the shape.

    Returns:
        One value per name of ``STAT_COLUMNS``. ``pixel_*`` values are in rescaled (modality)
        units; ``*_norm``, ``dynamic_range`` and ``texture`` are fractions of the stored range
        in the MONOCHROME2 convention; ``frac_*`` are shares of pixels at the image's
        extremes, inside the exposed field (``_exposed_field``).
    """

    # 1. Extremes over every image pixel: a single hot pixel decides the bits used.
    image = pixels if padding is None else pixels[~padding]
    low, high = int(image.min()), int(image.max())

    # 2. Moments, percentiles and saturation on the strided subsample.
    sample = _subsample(pixels)
    outside = None if padding is None else _subsample(padding)
    flat = sample.ravel() if outside is None else sample[~outside]
    if not flat.size:  # the grid met padding only: the image pixels stand in
        flat = image.ravel()
    k01, k99 = int(0.01 * (flat.size - 1)), int(0.99 * (flat.size - 1))
    ordered = np.partition(flat, (k01, k99))
    p01, p99 = float(ordered[k01]), float(ordered[k99])
    mean, std = float(flat.mean(dtype=np.float64)), float(flat.std(dtype=np.float64))
    field = _exposed_field(sample, low, high, outside)
    if not field.size:
        field = flat
    at_min = np.count_nonzero(field == low) / field.size
    at_max = np.count_nonzero(field == high) / field.size

    # 3. Rescaled values, then display-normalised values (MONOCHROME1 inverted).
    height, width = pixels.shape
    stats = {
        "height": height, "width": width, "min_side": min(height, width),
        "aspect": min(height, width) / max(height, width),
        "stored_min": low, "stored_max": high, "bits_used": high.bit_length(),
        "frac_at_min": at_min, "frac_at_max": at_max,
    }
    stats |= _rescaled(encoding, low, high, p01, p99, mean, std)
    stats |= _normalised(encoding, p01, p99, mean, std, at_min, at_max)
    stats["texture"] = _texture(sample, outside) / encoding.full_scale
    return stats


def _exposed_field(
    sample: np.ndarray, low: int, high: int, outside: np.ndarray | None = None,
) -> np.ndarray:
    """The image pixels of the subsample without its border bands: the leading and trailing rows
    and columns that lie wholly at the image's minimum or maximum, or in padding.

    Collimators and electronic shutters blank the image outside the exposed field; on an
    extremity radiograph that is often a third of the image or more (pydicom-data's tibia:
    41 %). The saturation shares are measured inside, where a clipped detector shows. A
    constant image has no field and is returned whole.

    Args:
        sample: the subsample.
        low: the image's minimum.
        high: its maximum.
        outside: True where the subsample is padding, or None.

    Returns:
        The field's values, without padding, flattened when there is padding.
    """
    lowest, highest = sample == low, sample == high
    if outside is not None:
        lowest, highest = lowest | outside, highest | outside
    rows = np.flatnonzero(~(lowest.all(axis=1) | highest.all(axis=1)))
    columns = np.flatnonzero(~(lowest.all(axis=0) | highest.all(axis=0)))
    if rows.size and columns.size:
        band = np.s_[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]
        sample = sample[band]
        outside = None if outside is None else outside[band]
    return sample if outside is None else sample[~outside]


def _texture(sample: np.ndarray, outside: np.ndarray | None = None) -> float:
    """Mean absolute difference between horizontal neighbours of the subsample, both not
    padding."""
    if sample.shape[1] < 2:
        return 0.0
    steps = np.abs(np.diff(sample.astype(np.int32), axis=1))
    if outside is not None:
        steps = steps[~(outside[:, 1:] | outside[:, :-1])]
    return float(steps.mean()) if steps.size else 0.0


def _rescaled(
    encoding: PixelEncoding, low: float, high: float, p01: float, p99: float, mean: float,
    std: float,
) -> dict[str, float]:
    """Apply the rescale slope and intercept; a negative slope swaps the extremes."""
    def rescale(value: float) -> float:
        return encoding.slope * value + encoding.intercept

    pixel_min, pixel_max = sorted((rescale(low), rescale(high)))
    pixel_p01, pixel_p99 = sorted((rescale(p01), rescale(p99)))
    return {
        "pixel_min": pixel_min, "pixel_max": pixel_max, "pixel_p01": pixel_p01,
        "pixel_p99": pixel_p99, "pixel_mean": rescale(mean),
        "pixel_std": abs(encoding.slope) * std,
    }


def _normalised(
    encoding: PixelEncoding, p01: float, p99: float, mean: float, std: float, at_min: float,
    at_max: float,
) -> dict[str, float]:
    """Express stored values as fractions of the stored range, bright = bone."""
    scale = encoding.full_scale

    def display(value: float) -> float:
        return 1.0 - value / scale if encoding.monochrome1 else value / scale

    p01_norm, p99_norm = sorted((display(p01), display(p99)))
    dark, bright = (at_max, at_min) if encoding.monochrome1 else (at_min, at_max)
    return {
        "mean_norm": display(mean), "std_norm": std / scale, "p01_norm": p01_norm,
        "p99_norm": p99_norm, "dynamic_range": p99_norm - p01_norm,
        "frac_dark": dark, "frac_bright": bright,
    }
