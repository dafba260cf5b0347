"""Radiologists' readings of the synthetic clinic: accredited double reading and a trainee.

Each image is read by two accredited readers drawn from ``readers.accredited``; each reader
independently mislabels the image with probability ``reader_error_rate``. When the two
disagree, a third accredited reader adjudicates, as practices with double reading do. A trainee
who is not accredited (``TRAINEE_ID``) also reads about 15 % of the images, with a high error
rate, so that the ingest stage's rule of keeping accredited readers only (ENISA control 4.28,
use reliable sources to label data) has something to reject.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from osteo.synthetic.population import NORMAL, OSTEOPOROSIS

TRAINEE_ID = "TRAINEE7"
TRAINEE_SHARE = 0.15
TRAINEE_ERROR_RATE = 0.35


@dataclass(frozen=True)
class Case:
    """An image to read.

    Attributes:
        image: file name relative to ``images/``.
        patient_ref: hospital reference of the patient.
        true_label: the label the latent T-score gives.
        study_at: when the image was taken; readings come after.
    """

    image: str
    patient_ref: str
    true_label: str
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
        error_rate: probability that an accredited reader mislabels an image.
        rng: generator.

    Returns:
        Annotations in the order they were signed (ties by image name).
    """
    annotations: list[Annotation] = []
    for case in cases:
        annotations.extend(_double_reading(case, accredited, error_rate, rng))
        if rng.random() < TRAINEE_SHARE:
            delay = dt.timedelta(minutes=int(rng.integers(60, 7 * 24 * 60)))
            label = _reading(case.true_label, TRAINEE_ERROR_RATE, rng)
            annotations.append(Annotation(case.image, case.patient_ref, TRAINEE_ID, label,
                                          case.study_at + delay))
    return sorted(annotations, key=lambda a: (a.annotated_at, a.image, a.reader_id))


def _double_reading(
    case: Case, accredited: Sequence[str], error_rate: float, rng: np.random.Generator
) -> list[Annotation]:
    """Two accredited readings, and a third when the first two disagree."""
    # Limitation: with only two accredited readers there is nobody left to adjudicate; their
    # disagreement is left in the export for the consensus rule of the ingest stage.
    order = rng.permutation(len(accredited))
    readings = []
    for position in order[:2]:
        signed = case.study_at + dt.timedelta(minutes=int(rng.integers(30, 3 * 24 * 60)))
        readings.append(Annotation(case.image, case.patient_ref, accredited[position],
                                   _reading(case.true_label, error_rate, rng), signed))
    if readings[0].label != readings[1].label and len(order) > 2:
        last = max(reading.annotated_at for reading in readings)
        signed = last + dt.timedelta(minutes=int(rng.integers(60, 2 * 24 * 60)))
        readings.append(Annotation(case.image, case.patient_ref, accredited[order[2]],
                                   _reading(case.true_label, error_rate, rng), signed))
    return readings


def _reading(true_label: str, error_rate: float, rng: np.random.Generator) -> str:
    """The true label, flipped with probability ``error_rate``."""
    if rng.random() >= error_rate:
        return true_label
    return NORMAL if true_label == OSTEOPOROSIS else OSTEOPOROSIS
