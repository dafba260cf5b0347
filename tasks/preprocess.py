"""Preprocess stage: the model's input images, and the function that makes them.

``to_model_input`` turns one radiograph's stored pixel values into the model's input image. It
is applied where the pixels are decoded, once per image: the ingest stage's worker processes
call it right after decoding each export file, so the full-resolution pixels are never written
to disk nor read again (``preprocess.size`` is therefore a parameter of the ingest stage too).
An image of which no model input can be made (an unusable window or rescale, a picture the
window leaves uniform) is recorded with ``input_reason`` and quarantined by the validate stage
with that reason.

The stage itself reads ``data/validated/records.parquet`` and the index of each
``data/pseudonymised/pixels/shard-*.npz`` (the record's ``shard`` and ``member``), and publishes
each shard in ``data/prepared/pixels/`` with only the accepted images (float16,
``preprocess.size`` x ``preprocess.size``, values in [0, 1], bone bright): a hard link of the
pseudonymised shard when every image of it is accepted, so that DVC stores and pushes the
pixels once, a new shard holding the accepted images' stored bytes otherwise. It writes
``data/prepared/records.parquet`` (image_id, patient_id, age, sex, bmi, label, shard, member and
``content_key``, the sha256 of the pixel array, which ingest computed as it made the array),
the images whose model input is missing or of another size in ``data/quarantine/preprocess.csv``
and the stage summary ``reports/preprocess.json``. No pixel is read or decoded here: the sizes
are checked against the arrays' headers.

Control 4.22, minimise data at each step of the processing: only the pixels the model needs
leave ingest, at the model's size, and past this stage only the fields used for training and
fairness checks travel on; acquisition attributes (photometric interpretation, rescale, window,
bit depth) stop here. It also takes part in control 4.9, control all data used by the ML model:
an image whose display window leaves a uniform picture never reaches training.

Per image, in this order (``to_model_input``):

1. modality rescale: stored value x slope + intercept (DICOM Modality LUT, linear case);
2. VOI window: the record's window center and width with the LINEAR function of DICOM PS3.3
   C.11.2.1.2, or, when the record has no window, the 0.5-99.5 % percentile range of the image
   (without the pixels the header declares as padding, Pixel Padding Value);
3. MONOCHROME1 images are inverted so that bone is bright, as in MONOCHROME2;
4. the values are in [0, 1]; steps 1-4 are one affine map and one clip, a single pass over the
   full-resolution image; padding pixels are then set to black;
5. antialiased bilinear resize: the longer side becomes ``size`` and the aspect ratio is kept,
   then the shorter side is padded with black (0, no attenuation) to a centred square, so that
   anatomy is never stretched. Padding after the resize costs far less than padding the
   full-resolution image first and gives the same picture up to sub-pixel rounding.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import task

from osteo.config import ConfigError
from osteo.layout import Layout
from osteo.progress import track
from osteo.quarantine import Quarantine
from osteo.shards import clear_shards, member_layouts, publish_members
from osteo.summary import StageSummary
from osteo.tables import read_stage_input

logger = logging.getLogger(__name__)

STAGE = "preprocess"
PERCENTILE_WINDOW = (0.5, 99.5)
# Images above this many pixels get their percentile window from a regular sub-grid
# (a full histogram of a 2500 x 2000 image costs 12 ms, a sub-grid of 2**18 pixels under 1 ms).
PERCENTILE_SAMPLE_PIXELS = 1 << 18
# A windowed image whose values span less than this is blank for the model.
UNIFORM_SPAN = 1e-3
PREPARED_COLUMNS = ["image_id", "patient_id", "age", "sex", "bmi", "label", "shard", "member",
                    "content_key"]


class PreprocessError(Exception):
    """The stage cannot run on its inputs (missing file or column); the message names it."""


class ImageRejected(Exception):
    """One image cannot be turned into a model input; it goes to the quarantine.

    Attributes:
        reason: a short, stable reason code, e.g. ``constant_image``.
        detail: a sentence a data engineer can act on, without identifying values.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Window:
    """A linear VOI window in modality units: ``lower`` maps to 0 and ``upper`` to 1.

    Values at or below ``lower`` give 0, values above ``upper`` give 1. A window with
    ``lower == upper`` is a step (the DICOM LINEAR window of width 1).
    """

    lower: float
    upper: float


# ---------------------------------------------------------------- per-image functions


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D image into a ``size`` x ``size`` square with antialiased bilinear filtering.

    The longer side becomes ``size`` and the aspect ratio is kept; the shorter side is padded
    with 0 on both sides to centre the image. Downscaling averages over the footprint of each
    output pixel (a triangle filter widened by the scale factor), so fine patterns do not alias.

    Args:
        image: 2-D array of any real dtype.
        size: side of the square output, in pixels.

    Returns:
        A ``size`` x ``size`` float32 array.
    """
    return _pad_square(_resize_fit(image, size), size)


def _resize_fit(image: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bilinear resize so that the longer side is ``size``, keeping the aspect ratio.

    Measured on the project's 2-core CPU, float32 input, output longer side 224, in ms per image
    (best of 7 on an idle machine; median of 5 with other jobs loading both cores):

    ===========  ===============  ================  =================
    input        PIL ``F``        torch, 1 thread   torch, 2 threads
    ===========  ===============  ================  =================
    512 x 416    0.59 / 1.70      0.44 / 1.25       0.23 / 6.5
    2500 x 2000  9.1 / 33         6.1 / 24          2.6 / 55
    ===========  ===============  ================  =================

    PIL (``BILINEAR``, which widens its filter when downscaling) and torch (``antialias=True``)
    compute the same filter, agreeing to 1e-5. Torch on one thread is the fastest choice that
    stays fast when the cores are shared: its two-thread runs wait on each other as soon as
    another process competes for a core. The ingest stage's workers, one per core, therefore
    run it inside ``single_threaded``.
    Importing torch takes about 1.3 s, once per process.
    """
    rows, columns = image.shape
    scale = size / max(rows, columns)
    height, width = max(1, round(rows * scale)), max(1, round(columns * scale))
    source = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    resized: np.ndarray = torch.nn.functional.interpolate(
        source[None, None], size=(height, width), mode="bilinear", antialias=True,
        align_corners=False,
    )[0, 0].numpy()
    return resized


def _pad_square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre an image of at most ``size`` x ``size`` on a black square."""
    height, width = image.shape
    if height == width == size:
        return image
    square = np.zeros((size, size), dtype=image.dtype)
    top, left = (size - height) // 2, (size - width) // 2
    square[top:top + height, left:left + width] = image
    return square


def to_model_input(
    pixels: np.ndarray, record: Mapping[str, Any], size: int = 224,
    padding: np.ndarray | None = None,
) -> np.ndarray:
    """Turn one radiograph's stored pixel values into the model's input image.

    Args:
        pixels: 2-D array of stored pixel values (uint16, as ``osteo.radiograph`` decodes them).
        record: the image's row: ``photometric``, ``rescale_slope``, ``rescale_intercept``,
            ``window_center``, ``window_width`` (window fields may be missing or NaN).
        size: side of the square output, in pixels.
        padding: True where a pixel is padding (``osteo.radiograph.Decoded.padding``): left
            out of the percentile window and shown black, as the square's own padding is.

    Returns:
        A ``size`` x ``size`` float16 array in [0, 1], bone bright.

    Raises:
        ImageRejected: the pixels or the record's attributes cannot give a usable image.
    """

    # 1. Modality rescale and VOI window, folded into one affine map of the stored values.
    if pixels.ndim != 2:
        raise ImageRejected("unexpected_shape", f"pixel array has {pixels.ndim} dimensions, not 2")
    slope, intercept = _rescale(record)
    window = _record_window(record) or _percentile_window(
        pixels if padding is None else pixels[~padding], slope, intercept)
    inverted = _inverted(record)

    # 2. Window, invert and clip at full resolution, black out the padding, then resize.
    display = _apply_window(pixels, slope, intercept, window, inverted)
    if padding is not None:
        display[padding] = 0
    image = _resize_fit(display, size)

    # 3. Refuse a picture the window left uniform: it carries nothing to learn from.
    low, high = float(image.min()), float(image.max())
    if high - low < UNIFORM_SPAN:
        raise ImageRejected(
            "uniform_after_window",
            f"every pixel is about {low:.2f} after windowing: the window lies outside the "
            "image's values or the image is constant",
        )

    # 4. Centre on the square canvas, stored as float16.
    return _pad_square(image, size).astype(np.float16)


def _number(value: Any) -> float | None:
    """A finite float, or None for a missing value (None, NaN, pandas NA)."""
    if value is None or pd.isna(value):
        return None
    return float(value)


def _rescale(record: Mapping[str, Any]) -> tuple[float, float]:
    """Rescale slope and intercept; absent values mean the identity (slope 1, intercept 0)."""
    slope = _number(record.get("rescale_slope"))
    intercept = _number(record.get("rescale_intercept"))
    slope = 1.0 if slope is None else slope
    intercept = 0.0 if intercept is None else intercept
    if slope == 0 or not math.isfinite(slope) or not math.isfinite(intercept):
        raise ImageRejected(
            "invalid_rescale", f"rescale slope {slope} and intercept {intercept} are unusable"
        )
    return slope, intercept


def _record_window(record: Mapping[str, Any]) -> Window | None:
    """The record's window as DICOM LINEAR bounds, or None when the record has none.

    PS3.3 C.11.2.1.2: values <= c - 0.5 - (w - 1) / 2 display at the minimum, values
    > c - 0.5 + (w - 1) / 2 at the maximum, linear in between. Width must be >= 1.
    """
    center, width = _number(record.get("window_center")), _number(record.get("window_width"))
    if center is None or width is None:
        return None
    if not (math.isfinite(center) and math.isfinite(width)) or width < 1:
        raise ImageRejected(
            "invalid_window",
            f"window width {width} with center {center}: DICOM linear windows need width >= 1",
        )
    return Window(center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2)


def _percentile_window(pixels: np.ndarray, slope: float, intercept: float) -> Window:
    """The 0.5-99.5 % range of the image's modality values, for records without a window.

    Percentiles are taken as the nearest lower rank. Limitation: images above
    ``PERCENTILE_SAMPLE_PIXELS`` are sampled on a regular sub-grid (every k-th row and column),
    so their window differs from the exact percentiles by the sampling error: with 2**18 or more
    samples each 0.5 % tail still holds hundreds of pixels.
    """
    step = max(1, math.isqrt(pixels.size // PERCENTILE_SAMPLE_PIXELS))  # keeps >= 2**18 samples
    # The image pixels of a padded radiograph come flattened: every step**2-th one is kept.
    sample = pixels[::step, ::step] if pixels.ndim == 2 else pixels[::step * step]
    if sample.dtype.kind == "u":
        # A histogram of integer values gives exact percentiles at a fraction of a sort's cost.
        cumulative = np.cumsum(np.bincount(sample.ravel()))
        ranks = np.array(PERCENTILE_WINDOW) / 100 * (cumulative[-1] - 1)
        low, high = np.searchsorted(cumulative, ranks, side="right").astype(float)
    else:
        low, high = np.percentile(sample, PERCENTILE_WINDOW)
    if high <= low:
        raise ImageRejected(
            "constant_image",
            "the image has no window and its 0.5-99.5 % range is empty (constant image)",
        )
    bounds = sorted((low * slope + intercept, high * slope + intercept))
    return Window(bounds[0], bounds[1])


def _inverted(record: Mapping[str, Any]) -> bool:
    """True for MONOCHROME1 (minimum is white), False for MONOCHROME2."""
    photometric = str(record.get("photometric"))
    if photometric not in {"MONOCHROME1", "MONOCHROME2"}:
        raise ImageRejected(
            "unsupported_photometric",
            f"photometric interpretation '{photometric}': only MONOCHROME1 and MONOCHROME2",
        )
    return photometric == "MONOCHROME1"


def _apply_window(
    pixels: np.ndarray, slope: float, intercept: float, window: Window, inverted: bool
) -> np.ndarray:
    """Map stored values to [0, 1] display values: rescale, window, invert, clip.

    With ``y = (slope * x + intercept - lower) / (upper - lower)`` the whole chain is
    ``clip(gain * x + offset, 0, 1)``; inversion is ``1 - y``, which commutes with the clip. One
    float32 array is allocated and updated in place (2500 x 2000: 3.0 ms in NumPy, 4.6 ms in
    torch on one thread).
    """
    span = window.upper - window.lower
    if span == 0:
        display = (pixels * slope + intercept > window.lower).astype(np.float32)
        return 1 - display if inverted else display
    gain, offset = slope / span, (intercept - window.lower) / span
    if inverted:
        gain, offset = -gain, 1 - offset
    display = np.multiply(pixels, np.float32(gain), dtype=np.float32)
    display += np.float32(offset)
    return np.clip(display, 0, 1, out=display)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block, restoring the previous count after.

    The per-image work is small; torch's thread team costs more than it saves as soon as the
    cores are shared (see ``_resize_fit``). A loop timing ``resize_bilinear`` should use it too.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------- the stage


@task(name=STAGE)
def preprocess(layout: Layout, params: dict[str, Any]) -> StageSummary:
    """Keep the model input of every validated image, or quarantine the image with its reason.

    Args:
        layout: the project's paths.
        params: the parsed ``params.yaml``; uses ``preprocess.size``.

    Returns:
        The stage summary (unit ``image``), also written to ``reports/preprocess.json``.

    Raises:
        ConfigError: a ``preprocess`` setting is missing or not a positive integer.
        PreprocessError: the validated records are missing or lack a column.
    """

    # 1. Read the settings and the validated records.
    started = time.perf_counter()
    size = setting(params, "size")
    records = read_stage_input(layout.validated_records, PREPARED_COLUMNS, PreprocessError,
                               "validate")
    quarantine = Quarantine(STAGE)

    # 2. Check each accepted model input against the array headers of its pseudonymised
    #    shard, and publish the shard with the images that passed, a shard at a time.
    prepared: list[dict[str, Any]] = []
    clear_shards(layout.prepared_pixel_dir)
    for source, batch in track(list(_batches(layout.pseudonymised_pixel_dir, records)),
                               "preparing images"):
        kept = []
        for record, rejection in check_shard(source, batch, size):
            if rejection is not None:
                quarantine.add(str(source.relative_to(layout.root)), rejection.reason,
                               rejection.detail, record_id=record["image_id"])
                continue
            kept.append(record)
        if kept:
            publish_members(source, layout.prepared_pixel_dir,
                            [record["member"] for record in kept])
            prepared.extend(kept)

    # 3. Write the prepared records, the quarantine and the summary.
    return _finish(layout, records, prepared, quarantine, size, time.perf_counter() - started)


def setting(params: dict[str, Any], key: str) -> int:
    """A positive integer setting of the ``preprocess`` section."""
    value = (params.get(STAGE) or {}).get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"params.yaml: {STAGE}.{key} must be a positive integer, got {value!r}")
    return value


def _batches(pixel_dir: Path, records: pd.DataFrame) -> Iterator[tuple[Path, pd.DataFrame]]:
    """The records grouped by the pseudonymised shard that holds their model input."""
    for shard_name, group in records.groupby("shard", sort=True, dropna=False):
        yield pixel_dir / ("" if pd.isna(shard_name) else str(shard_name)), group


def check_shard(
    source: Path, records: pd.DataFrame, size: int
) -> list[tuple[dict[str, Any], ImageRejected | None]]:
    """Check that a pseudonymised shard holds each record's model input, at the right size.

    Only the shard's index and array headers are read, not the pixels.

    Args:
        source: the shard file (the pixel directory itself for records without a shard).
        records: validated records whose model inputs are in ``source``.
        size: side of the square model input ``preprocess.size``.

    Returns:
        For each record, in order, the record's fields and the rejection that sends it to the
        quarantine, or None.
    """
    rows = records[PREPARED_COLUMNS].to_dict("records")
    if not source.is_file():
        absent = ImageRejected("missing_pixels", "the pixel shard named by the record is absent")
        return [(row, absent) for row in rows]
    layouts = member_layouts(source)
    return [(row, _rejection(layouts, row, size)) for row in rows]


def _rejection(
    layouts: dict[str, tuple[tuple[int, ...], np.dtype]], record: dict[str, Any], size: int,
) -> ImageRejected | None:
    """Why a record's model input cannot be used, or None."""
    if record["member"] not in layouts:
        return ImageRejected("missing_pixels", "the pixel shard holds no such image")
    if pd.isna(record["content_key"]):
        return ImageRejected("missing_pixels", "the record has no content key for its model "
                             "input: run the ingest stage again")
    shape, dtype = layouts[record["member"]]
    if shape != (size, size) or dtype != np.float16:
        return ImageRejected(
            "size_mismatch", f"the model input is {'x'.join(map(str, shape))} "
            f"{dtype} but preprocess.size is {size}: run the ingest stage again",
        )
    return None


def _finish(
    layout: Layout, records: pd.DataFrame, prepared: list[dict[str, Any]],
    quarantine: Quarantine, size: int, seconds: float,
) -> StageSummary:
    """Write the prepared records, the quarantine and the summary; log the counts."""
    table = pd.DataFrame(prepared, columns=PREPARED_COLUMNS)
    layout.prepared_dir.mkdir(parents=True, exist_ok=True)
    table.to_parquet(layout.prepared_records, index=False)
    quarantine.write(layout.quarantine(STAGE))
    shards = sorted(set(table["shard"]))
    summary = StageSummary(
        stage=STAGE, records_in=len(records), accepted=len(table),
        quarantined=quarantine.by_reason(), unit="image",
        outputs={"records": str(layout.prepared_records.relative_to(layout.root)),
                 "pixels": str(layout.prepared_pixel_dir.relative_to(layout.root)),
                 "quarantine": str(layout.quarantine(STAGE).relative_to(layout.root))},
        extra={"size": size, "dtype": "float16", "shards": len(shards),
               "seconds": round(seconds, 3)},
    )
    summary.write(layout.summary(STAGE))
    logger.info("preprocess: %d images in, %d prepared as %dx%d in %d shards, %d quarantined %s "
                "(%.1f s)", summary.records_in, summary.accepted, size, size, len(shards),
                summary.quarantined_total, summary.quarantined, seconds)
    return summary
