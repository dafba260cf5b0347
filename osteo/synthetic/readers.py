"""Radiologists' readings of the synthetic clinic: accredited double reading and a trainee.

A reader does not flip labels at random: judging bone density on a radiograph, a radiologist
perceives the patient's T-score with an error, and labels the image osteoporosis when the
perceived T-score is at or below the WHO threshold. Each reading draws its own error from a
normal law, so readers disagree and err on borderline cases (a T-score near -2.5) and almost
never on clear ones, as real readers do. The spread of that error is set so that a reader
mislabels ``reader_error_rate`` of the screening population's images on average
(``perception_sd``).

Each image is read by two accredited readers drawn from ``readers.accredited``. When the two
disagree, a third accredited reader adjudicates, as practices with double reading do. A trainee
who is not accredited (``TRAINEE_ID``) also reads about 15 % of the images, with a much larger
error, so that the ingest stage's rule of keeping accredited readers only (ENISA control 4.28,
use reliable sources to label data) has something to reject.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import optimize, special

from osteo.synthetic.population import WHO_THRESHOLD, draw_characteristics, true_label

TRAINEE_ID = "TRAINEE7"
TRAINEE_SHARE = 0.15
TRAINEE_ERROR_RATE = 0.35
REFERENCE_PATIENTS = 50_000  # size of the population the perception error is calibrated on
REFERENCE_SEED = 2023


@dataclass(frozen=True)
class Case:
    """An image to read.

    Attributes:
        image: file name relative to ``images/``.
        patient_ref: hospital reference of the patient.
        t_score: the patient's latent T-score, which readers perceive with an error.
        study_at: when the image was taken; readings come after.
    """

    image: str
    patient_ref: str
    t_score: float
    study_at: dt.datetime


@dataclass(frozen=True)
class Annotation:
    """One reader's label for one image.

    Attributes:
        image: file name relative to ``images/``.
        patient_ref: hospital reference of the patient.
        reader_id: reader identifier.
        label: ``"osteoporosis"`` or ``"normal"``.
        annotated_at: when the reading was signed.
    """

    image: str
    patient_ref: str
    reader_id: str
    label: str
    annotated_at: dt.datetime


def read_images(
    cases: Sequence[Case],
    accredited: Sequence[str],
    error_rate: float,
    rng: np.random.Generator,
) -> list[Annotation]:
    """Produce the readings of every case: double reading, adjudication, trainee readings.

    Args:
        cases: the images to read.
        accredited: accredited reader identifiers (at least two).
        error_rate: share of the screening population's images an accredited reader
            mislabels, in ``[0, 0.5)``.
        rng: generator.

    Returns:
        Annotations in the order they were signed (ties by image name).
    """
    accredited_sd, trainee_sd = perception_sd(error_rate), perception_sd(TRAINEE_ERROR_RATE)
    annotations: list[Annotation] = []
    for case in cases:
        annotations.extend(_double_reading(case, accredited, accredited_sd, rng))
        if rng.random() < TRAINEE_SHARE:
            delay = dt.timedelta(minutes=int(rng.integers(60, 7 * 24 * 60)))
            label = _reading(case.t_score, trainee_sd, rng)
            annotations.append(Annotation(case.image, case.patient_ref, TRAINEE_ID, label,
                                          case.study_at + delay))
    return sorted(annotations, key=lambda a: (a.annotated_at, a.image, a.reader_id))


@lru_cache(maxsize=8)
def perception_sd(error_rate: float) -> float:
    """Spread of a reader's T-score perception error that gives an average error rate.

    A reading of a patient with T-score ``t`` is wrong with probability
    ``Phi(-|t + 2.5| / sd)``; the spread is solved so that this probability averages
    ``error_rate`` over a large reference draw of the screening population, whatever the size
    of the export being generated.

    Args:
        error_rate: average share of mislabelled images, in ``[0, 0.5)``.

    Returns:
        The standard deviation of the perception error, in T-score units (0 for no error).
    """
    if error_rate <= 0:
        return 0.0
    t_scores = draw_characteristics(REFERENCE_PATIENTS, np.random.default_rng(REFERENCE_SEED))[5]
    distance = np.abs(t_scores - WHO_THRESHOLD)

    def excess(sd: float) -> float:
        return float(special.ndtr(-distance / sd).mean()) - error_rate

    return float(optimize.brentq(excess, 1e-6, 1e3))


def _double_reading(
    case: Case, accredited: Sequence[str], sd: float, rng: np.random.Generator
) -> list[Annotation]:
    """Two accredited readings, and a third when the first two disagree."""
    # Limitation: with only two accredited readers there is nobody left to adjudicate; their
    # disagreement is left in the export for the consensus rule of the ingest stage.
    order = rng.permutation(len(accredited))
    readings = []
    for position in order[:2]:
        signed = case.study_at + dt.timedelta(minutes=int(rng.integers(30, 3 * 24 * 60)))
        readings.append(Annotation(case.image, case.patient_ref, accredited[position],
                                   _reading(case.t_score, sd, rng), signed))
    if readings[0].label != readings[1].label and len(order) > 2:
        last = max(reading.annotated_at for reading in readings)
        signed = last + dt.timedelta(minutes=int(rng.integers(60, 2 * 24 * 60)))
        readings.append(Annotation(case.image, case.patient_ref, accredited[order[2]],
                                   _reading(case.t_score, sd, rng), signed))
    return readings


def _reading(t_score: float, sd: float, rng: np.random.Generator) -> str:
    """The WHO label of the T-score as one reader perceives it, with an error of spread ``sd``."""
    return true_label(t_score + rng.normal(0.0, sd))
