"""Writing a whole synthetic hospital export, and the ground truth beside it.

Output, per the export contract: ``<out_dir>/patients.csv``, ``<out_dir>/annotations.csv`` and
``<out_dir>/images/IMG??????.dcm|png``; the ground truth (image, patient_ref, t_score,
true_label) goes to a CSV outside the export, ``<out_dir>.truth.csv`` by default, because a real
export never carries it.

Every random draw comes from a numpy generator seeded from ``(seed, purpose, index)``, so the
same seed gives byte-identical files, and the tables do not depend on whether images are
rendered (``write_images=False`` gives the same CSVs, much faster).

Developing and testing the pipeline on this export rather than on patients' radiographs is part
of ENISA control 4.23 (implement a privacy by design process).
"""

from __future__ import annotations

import csv
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from osteo.config import ConfigError
from osteo.progress import track
from osteo.synthetic.dicom import (
    OPERATORS,
    REFERRING_PHYSICIANS,
    STATIONS,
    Study,
    image_uid,
    study_uids,
    write_dicom,
    write_png,
)
from osteo.synthetic.phantom import draw_positioning, patient_anatomy, render_radiograph
from osteo.synthetic.population import OSTEOPOROSIS, Patient, draw_patients
from osteo.synthetic.readers import TRAINEE_ID, Annotation, Case, read_images

logger = logging.getLogger(__name__)

PATIENT_COLUMNS = ("patient_ref", "first_name", "last_name", "age", "sex", "bmi")
ANNOTATION_COLUMNS = ("image", "patient_ref", "reader_id", "label", "annotated_at")
TRUTH_COLUMNS = ("image", "patient_ref", "t_score", "true_label")
MAX_IMAGES = 999_999  # file names carry six digits

# Purposes of the random streams; each stream is seeded from (seed, purpose, index...).
_POPULATION, _PLAN, _ANATOMY, _RENDER, _READERS = 1, 2, 3, 4, 5


class ExportExistsError(ConfigError):
    """The output directory already holds files and replacing them was not asked for."""


@dataclass(frozen=True)
class GenerationSettings:
    """What to generate; defaults match the repository's ``params.yaml``.

    Attributes:
        seed: seed of every random draw (non-negative).
        patients: number of patients.
        images_per_patient: inclusive (min, max) radiographs per patient, min >= 1.
        image_size: (rows, columns) of each radiograph.
        reader_error_rate: share of images an accredited reader mislabels on average, in
            [0, 0.5); errors fall on borderline T-scores (``osteo.synthetic.readers``).
        png_fraction: share of images written as 16-bit PNG instead of DICOM, in [0, 1].
        accredited_readers: identifiers of the accredited readers (at least two).
    """

    seed: int = 20231
    patients: int = 500
    images_per_patient: tuple[int, int] = (1, 2)
    image_size: tuple[int, int] = (512, 416)
    reader_error_rate: float = 0.08
    png_fraction: float = 0.0
    accredited_readers: tuple[str, ...] = ("RAD01", "RAD02", "RAD03")

    def check(self) -> None:
        """Refuse settings that cannot make an export.

        Raises:
            ConfigError: naming the offending setting.
        """
        low, high = self.images_per_patient
        problems = {
            "generate.seed must be a non-negative integer": self.seed < 0,
            "generate.patients must be at least 1": self.patients < 1,
            "generate.images_per_patient must be [min, max] with 1 <= min <= max":
                not 1 <= low <= high,
            f"generate.patients x images_per_patient max exceeds {MAX_IMAGES} images":
                self.patients * high > MAX_IMAGES,
            "generate.image_size must be [rows, columns], each at least 32":
                min(self.image_size) < 32,
            "generate.reader_error_rate must be in [0, 0.5)": not 0 <= self.reader_error_rate < 0.5,
            "generate.png_fraction must be in [0, 1]": not 0 <= self.png_fraction <= 1,
            "readers.accredited must list at least two distinct readers":
                len(set(self.accredited_readers)) < 2,
            f"readers.accredited must not include the trainee {TRAINEE_ID}":
                TRAINEE_ID in self.accredited_readers,
        }
        failed = [message for message, bad in problems.items() if bad]
        if failed:
            raise ConfigError("; ".join(failed))


@dataclass(frozen=True)
class GenerationSummary:
    """What a generation run wrote.

    Attributes:
        out_dir: the export directory.
        truth_path: the ground-truth CSV (outside the export).
        patients: patients in ``patients.csv``.
        images: images listed in the annotations.
        dicom_files: DICOM files written (0 when images were not rendered).
        png_files: PNG files written (0 when images were not rendered).
        annotations: rows of ``annotations.csv``.
        unaccredited_annotations: of which by readers outside ``readers.accredited``.
        adjudications: images a third accredited reader had to adjudicate.
        patients_by_sex: patient counts by sex.
        osteoporosis_by_sex: patients with a true osteoporosis label, by sex.
        seconds: wall-clock duration.
    """

    out_dir: Path
    truth_path: Path
    patients: int
    images: int
    dicom_files: int
    png_files: int
    annotations: int
    unaccredited_annotations: int
    adjudications: int
    patients_by_sex: dict[str, int] = field(default_factory=dict)
    osteoporosis_by_sex: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def prevalence(self, sex: str) -> float:
        """Share of patients of ``sex`` (``"F"`` or ``"M"``) whose true label is osteoporosis."""
        total = self.patients_by_sex.get(sex, 0)
        return self.osteoporosis_by_sex.get(sex, 0) / total if total else 0.0


@dataclass(frozen=True)
class _PlannedImage:
    """One radiograph to produce: its file name, patient and place in the study."""

    name: str
    index: int
    patient_index: int
    instance_number: int


def settings_from_params(params: Mapping[str, Any]) -> GenerationSettings:
    """Read the generation settings from a ``params.yaml`` dictionary.

    Missing keys take the defaults of ``GenerationSettings``.

    Args:
        params: the parameters, with sections ``generate`` and ``readers``.

    Returns:
        The checked settings.

    Raises:
        ConfigError: when a setting has the wrong type or an unusable value.
    """
    section = params.get("generate") or {}
    readers = (params.get("readers") or {}).get("accredited")
    defaults = GenerationSettings()
    try:
        settings = GenerationSettings(
            seed=int(section.get("seed", defaults.seed)),
            patients=int(section.get("patients", defaults.patients)),
            images_per_patient=_pair(section.get("images_per_patient",
                                                 defaults.images_per_patient)),
            image_size=_pair(section.get("image_size", defaults.image_size)),
            reader_error_rate=float(section.get("reader_error_rate", defaults.reader_error_rate)),
            png_fraction=float(section.get("png_fraction", defaults.png_fraction)),
            accredited_readers=tuple(str(r) for r in (readers or defaults.accredited_readers)),
        )
    except (TypeError, ValueError) as error:
        raise ConfigError(f"params.yaml 'generate' section is not usable: {error}") from None
    settings.check()
    return settings


def _pair(value: Any) -> tuple[int, int]:
    """Two integers from a YAML list."""
    low, high = value
    return int(low), int(high)


def default_truth_path(out_dir: Path) -> Path:
    """Where the ground truth goes by default: ``<out_dir>.truth.csv``, beside the export.

    Args:
        out_dir: the export directory.

    Returns:
        The sibling CSV path.
    """
    resolved = out_dir.resolve()
    return resolved.with_name(resolved.name + ".truth.csv")


def generate_export(
    out_dir: Path,
    *,
    seed: int,
    patients: int,
    images_per_patient: tuple[int, int],
    image_size: tuple[int, int],
    reader_error_rate: float,
    png_fraction: float,
    accredited_readers: Sequence[str],
    truth_path: Path | None = None,
    write_images: bool = True,
    force: bool = False,
) -> GenerationSummary:
    """Generate a synthetic hospital export and its ground truth.

    Args:
        out_dir: export directory; created if missing, must be empty unless ``force``.
        seed: seed of every random draw.
        patients: number of patients.
        images_per_patient: inclusive (min, max) radiographs per patient.
        image_size: (rows, columns) of each radiograph.
        reader_error_rate: share of images an accredited reader mislabels on average.
        png_fraction: share of images written as 16-bit PNG.
        accredited_readers: accredited reader identifiers (two or more).
        truth_path: ground-truth CSV; default ``<out_dir>.truth.csv``. Must be outside
            ``out_dir``.
        write_images: render and write the radiographs; False writes the tables only.
        force: replace the files of a previous export in ``out_dir``.

    Returns:
        Counts and paths of what was written.

    Raises:
        ConfigError: when a setting is unusable or the truth file would be inside the export.
        ExportExistsError: when ``out_dir`` is not empty and ``force`` is False.
    """
    # 1. Settings and destination.
    started = time.perf_counter()
    settings = GenerationSettings(seed, patients, _pair(images_per_patient), _pair(image_size),
                                  reader_error_rate, png_fraction, tuple(accredited_readers))
    settings.check()
    truth_path = _prepare_destination(Path(out_dir), truth_path, force)

    # 2. Patients, their studies and the images to take.
    people = draw_patients(patients, _stream(seed, _POPULATION))
    plan, studies, png_images = _plan(people, settings)

    # 3. Radiographs, readings, tables.
    if write_images:
        _write_images(out_dir / "images", plan, people, studies, png_images, settings)
    cases = [Case(item.name, people[item.patient_index].ref,
                  people[item.patient_index].t_score, people[item.patient_index].study_at)
             for item in plan]
    annotations = read_images(cases, settings.accredited_readers, reader_error_rate,
                              _stream(seed, _READERS))
    _write_tables(out_dir, truth_path, people, plan, annotations)

    # 4. Summary, logged without any identifying value.
    summary = _summarise(out_dir, truth_path, people, plan, png_images, annotations, settings,
                         write_images, time.perf_counter() - started)
    logger.info("synthetic export: %d patients, %d images (%d DICOM, %d PNG), %d annotations "
                "in %.1f s -> %s; ground truth -> %s", summary.patients, summary.images,
                summary.dicom_files, summary.png_files, summary.annotations, summary.seconds,
                out_dir, truth_path)
    return summary


def generate_from_params(
    params: Mapping[str, Any], out_dir: Path, **overrides: Any
) -> GenerationSummary:
    """Generate an export with the settings of ``params.yaml``, some of them overridden.

    Args:
        params: the parameters dictionary (sections ``generate`` and ``readers``).
        out_dir: export directory.
        **overrides: keyword arguments of ``generate_export`` replacing the params' values
            (e.g. ``patients=20``, ``truth_path=...``, ``force=True``).

    Returns:
        Counts and paths of what was written.

    Raises:
        ConfigError: when a setting is unusable.
    """
    kwargs: dict[str, Any] = asdict(settings_from_params(params))
    kwargs.update({key: value for key, value in overrides.items() if value is not None})
    return generate_export(out_dir, **kwargs)


def _stream(seed: int, purpose: int, *index: int) -> np.random.Generator:
    """Independent random stream for one purpose (and one patient or image)."""
    return np.random.default_rng([seed, purpose, *index])


def _prepare_destination(out_dir: Path, truth_path: Path | None, force: bool) -> Path:
    """Check the export directory is empty (or clear a previous export) and place the truth."""
    truth = (truth_path or default_truth_path(out_dir)).resolve()
    if truth.is_relative_to(out_dir.resolve()):
        raise ConfigError(f"the ground truth {truth} must be outside the export {out_dir}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise ExportExistsError(
                f"{out_dir} is not empty; choose another directory or pass --force to replace "
                "the previous export (patients.csv, annotations.csv, images/)")
        shutil.rmtree(out_dir / "images", ignore_errors=True)
        for name in ("patients.csv", "annotations.csv"):
            (out_dir / name).unlink(missing_ok=True)
        leftovers = sum(1 for _ in out_dir.iterdir())
        if leftovers:
            logger.warning("%d other entries left untouched in %s", leftovers, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    truth.parent.mkdir(parents=True, exist_ok=True)
    return truth


def _plan(
    people: Sequence[Patient], settings: GenerationSettings
) -> tuple[list[_PlannedImage], list[Study], set[int]]:
    """Decide how many images each patient has, their file names and formats, and the studies."""
    rng = _stream(settings.seed, _PLAN)
    low, high = settings.images_per_patient
    counts = rng.integers(low, high, size=len(people), endpoint=True)
    total = int(counts.sum())
    numbers = rng.permutation(total) + 1  # file numbers say nothing about the patient
    png_images = set(rng.choice(total, size=round(settings.png_fraction * total),
                                replace=False).tolist())
    plan: list[_PlannedImage] = []
    for patient_index, count in enumerate(counts):
        for instance in range(1, int(count) + 1):
            index = len(plan)
            suffix = "png" if index in png_images else "dcm"
            plan.append(_PlannedImage(f"IMG{numbers[index]:06d}.{suffix}", index,
                                      patient_index, instance))
    return plan, _studies(len(people), settings.seed, rng), png_images


def _studies(count: int, seed: int, rng: np.random.Generator) -> list[Study]:
    """One study per patient: room, order number, physicians and identifiers."""
    shares = np.array([station.share for station in STATIONS])
    rooms = rng.choice(len(STATIONS), size=count, p=shares / shares.sum())
    accessions = rng.choice(90_000_000, size=count, replace=False) + 10_000_000
    studies = []
    for i in range(count):
        study_uid, series_uid = study_uids(seed, i)
        studies.append(Study(
            station=STATIONS[rooms[i]],
            study_uid=study_uid,
            series_uid=series_uid,
            accession=f"A{accessions[i]}",
            study_id=str(int(rng.integers(1000, 100_000))),
            referring=REFERRING_PHYSICIANS[rng.integers(len(REFERRING_PHYSICIANS))],
            operator=OPERATORS[rng.integers(len(OPERATORS))],
        ))
    return studies


def _write_images(
    images_dir: Path, plan: Sequence[_PlannedImage], people: Sequence[Patient],
    studies: Sequence[Study], png_images: set[int], settings: GenerationSettings,
) -> None:
    """Render every planned radiograph and write it as DICOM or PNG."""
    images_dir.mkdir(parents=True, exist_ok=True)
    shape = settings.image_size
    for item in track(plan, "simulating radiographs"):
        patient, study = people[item.patient_index], studies[item.patient_index]
        anatomy = patient_anatomy(patient.t_score, patient.bmi, patient.sex,
                                  _stream(settings.seed, _ANATOMY, item.patient_index))
        rng = _stream(settings.seed, _RENDER, item.index)
        radiograph = render_radiograph(anatomy, draw_positioning(rng), shape,
                                       study.station.bits_stored, rng)
        path = images_dir / item.name
        if item.index in png_images:
            write_png(path, radiograph)
        else:
            write_dicom(path, radiograph, patient, study, item.instance_number,
                        image_uid(settings.seed, item.index))


def _write_tables(
    out_dir: Path, truth_path: Path, people: Sequence[Patient],
    plan: Sequence[_PlannedImage], annotations: Sequence[Annotation],
) -> None:
    """Write patients.csv and annotations.csv in the export, and the ground truth beside it."""
    _write_csv(out_dir / "patients.csv", PATIENT_COLUMNS, (
        (p.ref, p.first_name, p.last_name, p.age, p.sex, f"{p.bmi:.1f}") for p in people))
    _write_csv(out_dir / "annotations.csv", ANNOTATION_COLUMNS, (
        (a.image, a.patient_ref, a.reader_id, a.label, a.annotated_at.isoformat())
        for a in annotations))
    _write_csv(truth_path, TRUTH_COLUMNS, (
        (item.name, people[item.patient_index].ref, f"{people[item.patient_index].t_score:.3f}",
         people[item.patient_index].true_label) for item in plan))


def _write_csv(path: Path, columns: Sequence[str], rows: Any) -> None:
    """UTF-8 CSV with a header, minimal quoting and Unix line ends."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)


def _summarise(
    out_dir: Path, truth_path: Path, people: Sequence[Patient], plan: Sequence[_PlannedImage],
    png_images: set[int], annotations: Sequence[Annotation], settings: GenerationSettings,
    write_images: bool, seconds: float,
) -> GenerationSummary:
    """Count what was written."""
    accredited = set(settings.accredited_readers)
    readings_per_image: dict[str, int] = {}
    for annotation in annotations:
        if annotation.reader_id in accredited:
            readings_per_image[annotation.image] = readings_per_image.get(annotation.image, 0) + 1
    by_sex = {sex: sum(p.sex == sex for p in people) for sex in ("F", "M")}
    positives = {sex: sum(p.sex == sex and p.true_label == OSTEOPOROSIS for p in people)
                 for sex in ("F", "M")}
    png_files = len(png_images) if write_images else 0
    return GenerationSummary(
        out_dir=out_dir,
        truth_path=truth_path,
        patients=len(people),
        images=len(plan),
        dicom_files=len(plan) - len(png_images) if write_images else 0,
        png_files=png_files,
        annotations=len(annotations),
        unaccredited_annotations=sum(a.reader_id not in accredited for a in annotations),
        adjudications=sum(count > 2 for count in readings_per_image.values()),
        patients_by_sex=by_sex,
        osteoporosis_by_sex=positives,
        seconds=seconds,
    )
