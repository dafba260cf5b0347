"""Radiograph simulation: a lateral lumbar spine phantom seen by a digital X-ray detector.

The phantom is a column of vertebral bodies (elliptic cylinders with a cortical shell, dense
endplates and a trabecular core) with their posterior arches, inside a soft-tissue body whose
depth and width grow with BMI, with a few bowel-gas pockets and a lead side marker. Bone follows
the T-score through clear monotone functions (``trabecular_fraction``, ``cortical_thickness_mm``,
``horizontal_strut_share``, ``endplate_concavity_mm``): as the T-score falls the trabecular
network thins, loses its horizontal struts and breaks up into vertical streaks, the cortex gets
thinner and the endplates more concave.

Image formation: line integrals of attenuation (Beer-Lambert) through the phantom, automatic
exposure control aiming at a fixed photon count behind the spine, Poisson photon noise, light
spread in the scintillator, electronic noise and a logarithmic readout quantised to
``bits_stored``. Stored values keep the MONOCHROME2 convention (bone bright); the writer inverts
them for MONOCHROME1. Geometry is in millimetres, so the same patient looks the same at any
image size; only the noise and the sharpness change. Patient size, positioning, exposure and
bowel gas vary from image to image, so that the model meets the variety of a real room (ENISA
control 4.26, ensure that the model is sufficiently resilient to the environment).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import fft, ndimage, special

FIELD_HEIGHT_MM = 240.0  # height of the detector field; pixels are square
MU_SOFT = 0.021  # effective linear attenuation of soft tissue and marrow, 1/mm
MU_BONE = 0.075  # effective linear attenuation of mineralised bone tissue, 1/mm
MU_LEAD_PATH = 12.0  # line integral of the lead side marker (saturates the detector)
AEC_PHOTONS_PER_MM2 = 3000.0  # detector exposure the automatic exposure control aims at
ELECTRONIC_NOISE = 2.0  # read-out noise, photon equivalents per pixel
SCINTILLATOR_BLUR_MM = 0.3  # standard deviation of the light spread
READOUT_LOW, READOUT_HIGH = -3.5, 4.0  # log-exposure range (relative to the AEC level) stored
TEXTURE_MODULATION = 0.5  # contrast of the projected trabecular pattern around its mean
STRUT_SPACING_MM = 1.4  # typical spacing of trabecular struts


def trabecular_fraction(t_score: float) -> float:
    """Bone volume fraction (BV/TV) of vertebral trabecular bone; rises monotonically with T.

    Args:
        t_score: T-score.

    Returns:
        BV/TV between 0 and 1 (0.25 at T = 0, 0.13 at T = -2.5).
    """
    return float(min(0.25 * np.exp(0.26 * t_score), 0.6))


def cortical_thickness_mm(t_score: float) -> float:
    """Thickness of the vertebral cortical shell; rises monotonically with T.

    Args:
        t_score: T-score.

    Returns:
        Thickness in millimetres (1.1 mm at T = 0).
    """
    return float(1.1 * np.exp(0.14 * t_score))


def horizontal_strut_share(t_score: float) -> float:
    """Share of horizontal struts in the trabecular network; they are lost first, so it rises
    monotonically with T.

    Args:
        t_score: T-score.

    Returns:
        Share between 0 and 0.45.
    """
    return float(0.45 * special.expit((t_score + 2.0) / 0.7))


def endplate_concavity_mm(t_score: float) -> float:
    """Depth of the endplate concavity; grows as T falls (biconcave osteoporotic vertebrae).

    Args:
        t_score: T-score.

    Returns:
        Depth in millimetres.
    """
    return float(0.6 + 1.8 * special.expit(-(t_score + 3.0) / 0.6))


@dataclass(frozen=True)
class Anatomy:
    """What stays the same across the radiographs of one patient.

    Attributes:
        t_score: latent T-score driving the bone.
        scale: vertebra size factor (larger for men).
        lordosis_per_mm: curvature of the lumbar column, 1/mm.
        column_phase_mm: vertical position of the vertebrae in the field.
        body_half_depth_mm: antero-posterior half-depth of the trunk.
        body_half_width_mm: lateral half-width of the trunk (along the beam).
        back_depth_mm: distance from the vertebral body centre to the skin of the back.
    """

    t_score: float
    scale: float
    lordosis_per_mm: float
    column_phase_mm: float
    body_half_depth_mm: float
    body_half_width_mm: float
    back_depth_mm: float


@dataclass(frozen=True)
class Positioning:
    """How the patient lay on the table for one radiograph.

    Attributes:
        shift_mm: (horizontal, vertical) offset of the spine from the field centre.
        rotation_rad: in-plane rotation.
        facing_right: anterior side on the right of the image (otherwise on the left).
        exposure: actual / intended detector exposure (automatic exposure control error).
        marker_jitter_mm: offset of the lead side marker from its usual corner.
    """

    shift_mm: tuple[float, float]
    rotation_rad: float
    facing_right: bool
    exposure: float
    marker_jitter_mm: tuple[float, float]


@dataclass
class Radiograph:
    """A simulated radiograph as the detector stores it.

    Attributes:
        pixels: stored values, uint16 below ``2**bits_stored``, bone bright (MONOCHROME2).
        bits_stored: detector bit depth.
        pixel_spacing_mm: size of a (square) pixel.
        trabecular_mask: pixels inside the trabecular cores of the vertebral bodies.
        disc_mask: pixels of the intervertebral discs (soft tissue beside the same bone).
        soft_tissue_value: stored value of soft tissue at the spine, for display windowing.
        facing_right: anterior side on the right of the image.
    """

    pixels: np.ndarray
    bits_stored: int
    pixel_spacing_mm: float
    trabecular_mask: np.ndarray
    disc_mask: np.ndarray
    soft_tissue_value: float
    facing_right: bool


def patient_anatomy(t_score: float, bmi: float, sex: str, rng: np.random.Generator) -> Anatomy:
    """Draw the anatomy of one patient.

    Args:
        t_score: latent T-score.
        bmi: body-mass index; the trunk is deeper and wider, the back thicker, as it rises.
        sex: ``"F"`` or ``"M"``; men have larger vertebrae.
        rng: generator.

    Returns:
        The patient's anatomy.
    """
    excess = bmi - 25.0
    scale = (1.08 if sex == "M" else 1.0) * float(rng.normal(1.0, 0.05))
    return Anatomy(
        t_score=t_score,
        scale=scale,
        lordosis_per_mm=float(rng.uniform(0.0004, 0.0015)),
        column_phase_mm=float(rng.uniform(0.0, 40.0)),
        body_half_depth_mm=max(100.0 + 4.5 * excess, 70.0) * float(rng.normal(1.0, 0.04)),
        body_half_width_mm=max(140.0 + 6.0 * excess, 100.0) * float(rng.normal(1.0, 0.04)),
        back_depth_mm=max(55.0 + 2.5 * excess, 40.0) * float(rng.normal(1.0, 0.05)),
    )


def draw_positioning(rng: np.random.Generator) -> Positioning:
    """Draw the positioning of one radiograph: a few millimetres and degrees off.

    Args:
        rng: generator.

    Returns:
        The positioning.
    """
    return Positioning(
        shift_mm=(float(rng.normal(0.0, 6.0)), float(rng.normal(0.0, 8.0))),
        rotation_rad=float(np.deg2rad(rng.normal(0.0, 2.5))),
        facing_right=bool(rng.random() < 0.5),
        exposure=float(np.exp(rng.normal(0.0, 0.12))),
        marker_jitter_mm=(float(rng.normal(0.0, 3.0)), float(rng.normal(0.0, 3.0))),
    )


def render_radiograph(
    anatomy: Anatomy,
    positioning: Positioning,
    shape: tuple[int, int],
    bits_stored: int,
    rng: np.random.Generator,
) -> Radiograph:
    """Simulate one lateral lumbar radiograph.

    Args:
        anatomy: the patient.
        positioning: how the patient lay.
        shape: (rows, columns) of the detector.
        bits_stored: bit depth of the stored values (12 or 14 are usual).
        rng: generator for the trabecular network, gas pockets and noise.

    Returns:
        The stored radiograph and the masks of its bone and disc regions.
    """
    # 1. Anatomical coordinates (u antero-posterior, v cranio-caudal) of every pixel, in mm.
    spacing = FIELD_HEIGHT_MM / shape[0]
    u, v = _anatomical_grid(shape, spacing, positioning)

    # 2. Soft tissue of the trunk, then the vertebrae, posterior arches and gas pockets.
    soft, soft_at_spine = _soft_tissue(u, v, anatomy)
    bone, trabecular_mask, disc_mask = _spine(u, v, anatomy, spacing, rng)
    line_integral = MU_SOFT * soft + (MU_BONE - MU_SOFT) * bone
    line_integral -= MU_SOFT * _gas_pockets(u, v, anatomy, rng)
    line_integral += _side_marker(shape, spacing, positioning)

    # 3. Detector: the exposure control aims at a fixed count behind the spine's soft tissue.
    target = AEC_PHOTONS_PER_MM2 * spacing**2
    incident = target * np.exp(MU_SOFT * soft_at_spine) * positioning.exposure
    pixels = _detect(incident * np.exp(-line_integral), target, spacing, bits_stored, rng)
    soft_value = _readout(np.array([target * positioning.exposure]), target, bits_stored)[0]
    return Radiograph(
        pixels=pixels,
        bits_stored=bits_stored,
        pixel_spacing_mm=spacing,
        trabecular_mask=trabecular_mask,
        disc_mask=disc_mask,
        soft_tissue_value=float(soft_value),
        facing_right=positioning.facing_right,
    )


def _anatomical_grid(
    shape: tuple[int, int], spacing: float, positioning: Positioning
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate and shift the detector grid into the patient's frame (u anterior, v caudal)."""
    rows, cols = shape
    y = (np.arange(rows, dtype=np.float32) - (rows - 1) / 2) * spacing
    x = (np.arange(cols, dtype=np.float32) - (cols - 1) / 2) * spacing
    if not positioning.facing_right:
        x = -x
    x = x[np.newaxis, :] - positioning.shift_mm[0]
    y = y[:, np.newaxis] - positioning.shift_mm[1]
    angle = positioning.rotation_rad
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return cos * x + sin * y, cos * y - sin * x


def _ellipse_chord(offset: np.ndarray, half_axis: float, half_width: float) -> np.ndarray:
    """Length of the chord along the beam through an elliptic cross-section at ``offset``."""
    inside = np.clip(1.0 - (offset / half_axis) ** 2, 0.0, None)
    return (2.0 * half_width) * np.sqrt(inside)


def _soft_tissue(u: np.ndarray, v: np.ndarray, anatomy: Anatomy) -> tuple[np.ndarray, float]:
    """Path length through the trunk at every pixel, and at the vertebral body centre."""
    centre = anatomy.body_half_depth_mm - anatomy.back_depth_mm
    u_trunk = u - anatomy.lordosis_per_mm * v**2 - centre
    path = _ellipse_chord(u_trunk, anatomy.body_half_depth_mm, anatomy.body_half_width_mm)
    at_spine = _ellipse_chord(np.array(-centre), anatomy.body_half_depth_mm,
                              anatomy.body_half_width_mm)
    return path, float(at_spine)


def _vertebra_size(anatomy: Anatomy) -> tuple[float, float, float, float]:
    """Half-depth, half-width and half-height of a vertebral body, and the column pitch, mm."""
    s = anatomy.scale
    return 17.0 * s, 22.0 * s, 13.0 * s, 35.0 * s


def _spine(
    u: np.ndarray, v: np.ndarray, anatomy: Anatomy, spacing: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bone path length (mineral-equivalent mm) of the column and its masks, on the full grid.

    Only the band of columns that can hold bone is computed.
    """
    bone = np.zeros(u.shape, dtype=np.float32)
    trabecular_mask = np.zeros(u.shape, dtype=bool)
    disc_mask = np.zeros(u.shape, dtype=bool)
    half_depth = _vertebra_size(anatomy)[0]
    sway = anatomy.lordosis_per_mm * float(np.max(np.abs(v))) ** 2
    window = _window(u, v, (-half_depth - 60.0 * anatomy.scale, half_depth + sway + 2.0))
    if window is not None:
        bone[window], trabecular_mask[window], disc_mask[window] = _vertebrae(
            u[window], v[window], anatomy, spacing, rng)
    return bone, trabecular_mask, disc_mask


def _window(
    u: np.ndarray, v: np.ndarray, u_limits: tuple[float, float],
    v_limits: tuple[float, float] = (-np.inf, np.inf),
) -> tuple[slice, slice] | None:
    """Bounding box of the pixels whose (u, v) may fall within the limits.

    u and v are affine in the pixel indices, so along a row or a column their extremes are at
    its two ends.
    """
    def reach(first: np.ndarray, last: np.ndarray, limits: tuple[float, float]) -> np.ndarray:
        return (np.maximum(first, last) >= limits[0]) & (np.minimum(first, last) <= limits[1])

    rows = np.flatnonzero(reach(u[:, 0], u[:, -1], u_limits) & reach(v[:, 0], v[:, -1], v_limits))
    cols = np.flatnonzero(reach(u[0], u[-1], u_limits) & reach(v[0], v[-1], v_limits))
    if rows.size == 0 or cols.size == 0:
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _vertebrae(
    u: np.ndarray, v: np.ndarray, anatomy: Anatomy, spacing: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bone path length of the vertebral bodies and arches, and the region masks."""
    # 1. Dimensions of this patient's vertebrae.
    half_depth, half_width, half_height, pitch = _vertebra_size(anatomy)
    t = anatomy.t_score
    cortex = cortical_thickness_mm(t)

    # 2. Each pixel in the frame of its own vertebra, tilted along the lordotic curve.
    u_loc, v_loc = _vertebra_frame(u, v, anatomy, pitch)
    across = np.clip(1.0 - (u_loc / half_depth) ** 2, 0.0, None)
    body_half_height = half_height - endplate_concavity_mm(t) * across
    in_body = (np.abs(v_loc) < body_half_height) & (across > 0)
    in_core = in_body & (np.abs(v_loc) < body_half_height - cortex)

    # 3. Cortical shell (walls seen tangentially, endplates seen face-on) and trabecular core.
    outer = _ellipse_chord(u_loc, half_depth, half_width)
    inner = _ellipse_chord(u_loc, half_depth - cortex, half_width - cortex)
    density = _trabecular_density(in_core, spacing, t, rng)
    bone = np.where(in_core, outer - inner + inner * density, np.where(in_body, outer, 0.0))
    bone += _posterior_arch(u_loc, v_loc, half_depth, half_height, anatomy.scale, t)

    # 4. Regions used to check the image: cores away from the walls, and disc centres.
    trabecular_mask = in_core & (np.abs(u_loc) < 0.7 * half_depth)
    disc_mask = (np.abs(v_loc) > half_height + 1.0) & (np.abs(u_loc) < 0.6 * half_depth)
    return bone, trabecular_mask, disc_mask


def _vertebra_frame(
    u: np.ndarray, v: np.ndarray, anatomy: Anatomy, pitch: float
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of each pixel relative to the centre and axis of its nearest vertebra.

    The column follows the curve u = k v^2 and repeats every ``pitch`` millimetres.
    """
    curvature = anatomy.lordosis_per_mm
    centre_v = anatomy.column_phase_mm + pitch * np.round((v - anatomy.column_phase_mm) / pitch)
    slope = 2.0 * curvature * centre_v
    norm = np.sqrt(1.0 + slope**2)
    du, dv = u - curvature * centre_v**2, v - centre_v
    return (du - slope * dv) / norm, (slope * du + dv) / norm


def _posterior_arch(
    u_loc: np.ndarray, v_loc: np.ndarray, half_depth: float, half_height: float,
    scale: float, t_score: float,
) -> np.ndarray:
    """Pedicles with laminae, and the spinous process, behind each vertebral body."""
    density = 0.35 + trabecular_fraction(t_score)
    pedicle_u = (u_loc + half_depth + 8.0 * scale) / (10.0 * scale)
    pedicle_v = (v_loc + 0.15 * half_height) / (0.55 * half_height)
    pedicles = 18.0 * scale * np.sqrt(np.clip(1.0 - pedicle_u**2 - pedicle_v**2, 0.0, None))
    spine_u = (u_loc + half_depth + 40.0 * scale) / (14.0 * scale)
    spine_v = v_loc / (0.35 * half_height)
    spinous = 8.0 * scale * np.sqrt(np.clip(1.0 - spine_u**2 - spine_v**2, 0.0, None))
    return density * (pedicles + spinous)


@lru_cache(maxsize=8)
def _strut_filters(shape: tuple[int, int], spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Fourier filters giving vertical and horizontal strut patterns on a grid (cached)."""
    # Limitation: below about 3 pixels per strut spacing (images under ~300 rows) the struts
    # are drawn coarser than anatomy; the mean density, which carries the T-score, is exact.
    k0 = min(spacing / STRUT_SPACING_MM, 0.33)  # cycles per pixel
    ky = fft.fftfreq(shape[0])[:, np.newaxis]
    kx = fft.rfftfreq(shape[1])[np.newaxis, :]
    band = 0.35 * k0
    vertical = np.exp(-0.5 * ((np.abs(kx) - k0) / band) ** 2 - 0.5 * (ky / (0.2 * k0)) ** 2)
    horizontal = np.exp(-0.5 * ((np.abs(ky) - k0) / band) ** 2 - 0.5 * (kx / (0.3 * k0)) ** 2)
    return vertical.astype(np.float32), horizontal.astype(np.float32)


def _trabecular_density(
    in_core: np.ndarray, spacing: float, t_score: float, rng: np.random.Generator
) -> np.ndarray:
    """Projected trabecular density over the columns holding vertebral cores.

    Its mean is exactly ``trabecular_fraction(t_score)``; outside the strip of columns that
    contain a core it is left at that mean.
    """
    # 1. The strip of columns to texture, widened to a multiple of 32 so filters are reused.
    fraction = trabecular_fraction(t_score)
    density = np.full(in_core.shape, fraction, dtype=np.float32)
    columns = np.flatnonzero(in_core.any(axis=0))
    if columns.size == 0:
        return density
    width = min(-(-(columns[-1] - columns[0] + 1) // 32) * 32, in_core.shape[1])
    start = min(int(columns[0]), in_core.shape[1] - width)
    shape = (in_core.shape[0], int(width))

    # 2. Anisotropic band-pass noise: vertical struts, plus horizontal ones while T is high.
    vertical_filter, horizontal_filter = _strut_filters(shape, spacing)
    spectrum = fft.rfft2(rng.standard_normal(shape, dtype=np.float32))
    vertical = fft.irfft2(spectrum * vertical_filter, s=shape)
    horizontal = fft.irfft2(spectrum * horizontal_filter, s=shape)
    share = horizontal_strut_share(t_score)
    field = (np.sqrt(1 - share) * vertical / vertical.std()
             + np.sqrt(share) * horizontal / horizontal.std())

    # 3. Soft threshold: E[Phi((F - c) / w)] = Phi(-c / sqrt(1 + w^2)) for F ~ N(0, 1).
    width_soft = 0.3
    cut = -np.sqrt(1 + width_soft**2) * special.ndtri(fraction)
    network = special.ndtr((field - cut) / width_soft)
    density[:, start:start + shape[1]] = fraction + TEXTURE_MODULATION * (network - fraction)
    return density


def _gas_pockets(
    u: np.ndarray, v: np.ndarray, anatomy: Anatomy, rng: np.random.Generator
) -> np.ndarray:
    """Path length of bowel gas (replacing soft tissue) in front of the spine."""
    gas = np.zeros(u.shape, dtype=np.float32)
    front = 2 * anatomy.body_half_depth_mm - anatomy.back_depth_mm
    for _ in range(int(rng.integers(0, 4))):
        cu = rng.uniform(35.0, max(front - 30.0, 40.0))
        cv = rng.uniform(-110.0, 110.0)
        ru, rv, depth = rng.uniform(6.0, 20.0), rng.uniform(6.0, 25.0), rng.uniform(10.0, 30.0)
        box = _window(u, v, (cu - ru, cu + ru), (cv - rv, cv + rv))
        if box is not None:
            inside = 1 - ((u[box] - cu) / ru) ** 2 - ((v[box] - cv) / rv) ** 2
            gas[box] += depth * np.sqrt(np.clip(inside, 0, None))
    return gas


def _side_marker(shape: tuple[int, int], spacing: float, positioning: Positioning) -> np.ndarray:
    """A lead letter "L" near the top corner on the posterior side, as technologists place it."""
    marker = np.zeros(shape, dtype=np.float32)
    size = max(int(round(12.0 / spacing)), 4)
    stroke = max(size // 4, 1)
    top = int(round(0.05 * shape[0] + positioning.marker_jitter_mm[1] / spacing))
    left = int(round(0.07 * shape[1] + positioning.marker_jitter_mm[0] / spacing))
    if positioning.facing_right:  # the back is on the left: the marker goes top left
        left = max(left, 0)
    else:
        left = min(shape[1] - left - size, shape[1] - size)
    top = min(max(top, 0), shape[0] - size)
    marker[top:top + size, left:left + stroke] = MU_LEAD_PATH
    marker[top + size - stroke:top + size, left:left + (2 * size) // 3] = MU_LEAD_PATH
    return marker


def _detect(
    expected: np.ndarray, target: float, spacing: float, bits_stored: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Photon counting, scintillator blur, electronic noise and logarithmic readout."""
    counts = _photon_counts(expected, rng)
    counts = ndimage.gaussian_filter(counts, SCINTILLATOR_BLUR_MM / spacing, mode="nearest")
    counts += ELECTRONIC_NOISE * rng.standard_normal(counts.shape, dtype=np.float32)
    return _readout(counts, target, bits_stored)


def _photon_counts(expected: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Poisson photon counts; above 50 expected photons the normal approximation is used."""
    expected = expected.astype(np.float32)
    counts = expected + np.sqrt(expected) * rng.standard_normal(expected.shape, dtype=np.float32)
    few = expected < 50.0
    counts[few] = rng.poisson(expected[few])
    return counts


def _readout(counts: np.ndarray, target: float, bits_stored: int) -> np.ndarray:
    """Map detected counts to stored values: logarithmic, attenuation bright, clipped."""
    top = 2**bits_stored - 1
    log_attenuation = np.log(target / np.maximum(counts, 0.5))
    scaled = (log_attenuation - READOUT_LOW) / (READOUT_HIGH - READOUT_LOW) * top
    return np.clip(np.rint(scaled), 0, top).astype(np.uint16)


def display_window(radiograph: Radiograph) -> tuple[float, float]:
    """Window a radiologist would display: soft tissue at the spine dark grey, bone near white.

    It depends on the exposure and the soft tissue only, never on the bone, so windowing keeps
    the bone's brightness relative to the soft tissue.

    Args:
        radiograph: the simulated radiograph.

    Returns:
        (centre, width) in stored MONOCHROME2 values.
    """
    per_log_unit = (2**radiograph.bits_stored - 1) / (READOUT_HIGH - READOUT_LOW)
    return radiograph.soft_tissue_value + 0.8 * per_log_unit, 3.2 * per_log_unit
