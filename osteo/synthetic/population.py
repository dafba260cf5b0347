"""The screening population of the synthetic clinic: who the patients are and how dense their bones.

Patients are adults over 50 referred for an osteoporosis screening, about two thirds of them
women. Each has a name (some with accents, apostrophes, quotes or non-Latin letters, as a real
patient file has), a hospital reference, an age, a sex, a height, a weight and a body-mass index,
and a latent T-score. The T-score falls with age, faster for women after the menopause, rises
with BMI and carries individual noise; the true label follows the WHO rule (T <= -2.5 is
osteoporosis), which gives roughly 18 % of women and 4 % of men.

Both sexes are present with their different prevalences, so that the fairness checks of ENISA
control 4.29 (ensure that models are unbiased) have groups to compare. Everything is drawn from
a numpy generator, so the same seed gives the same population.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

OSTEOPOROSIS = "osteoporosis"
NORMAL = "normal"
WHO_THRESHOLD = -2.5

# Share of women in the screening population.
FEMALE_SHARE = 0.65

# T-score model: intercept at age 50 and loss per year of age, by sex; gain per BMI unit above
# the reference BMI; spread of the individual term.
T_AT_50 = {"F": -0.55, "M": -0.25}
T_LOSS_PER_YEAR = {"F": 0.060, "M": 0.028}
T_GAIN_PER_BMI = 0.07
REFERENCE_BMI = 26.5
T_INDIVIDUAL_SD = 1.0

# Studies happen on weekdays between these dates, during opening hours.
FIRST_STUDY_DAY = dt.date(2021, 1, 4)
STUDY_DAYS = 3 * 365

FIRST_NAMES_F = (
    "Anne", "Marie", "Sophie", "Zoë", "Renée", "Hélène", "Margaret \"Peggy\"", "Ingrid",
    "Łucja", "Ólöf", "Chloé", "Fatima", "Agnieszka", "Siobhán", "Marie-Thérèse", "Ewa",
    "Catherine", "Dolores", "Yasmine", "Björg", "Σοφία", "Наталья", "Giulia", "Brigitte",
    "Jeanne", "Aoife", "Mercè", "Nadia", "Elisabeth", "Ana-María",
)
FIRST_NAMES_M = (
    "Jean", "Pierre", "José", "François", "Søren", "Robert \"Bob\"", "Jean-Luc", "Mehmet",
    "Ørjan", "Dmitri", "Grégoire", "Thomas", "Ciarán", "Łukasz", "Andreas", "Γιώργος",
    "Paolo", "Karim", "Hans-Jürgen", "Michel", "Antoine", "Seán",
)
LAST_NAMES = (
    "O'Brien", "Müller", "Martin", "Dubois", "D'Angelo", "N'Diaye", "Nguyễn", "Łukasiewicz",
    "Nørgaard", "Dvořák", "García Márquez", "van der Berg", "de la Cruz", "King, Jr.",
    "Schäfer", "Lefèvre", "Rossi", "Öztürk", "Kowalski", "Papadopoulos", "Ivanova", "Smith",
    "Bernard", "Petit", "Moreau", "Fernández", "Ó Súilleabháin", "Jørgensen", "Weiß",
    "Haddad", "Lambert", "Fontaine", "Mac Giolla", "Costa", "Żółkiewska", "Brown",
)


@dataclass(frozen=True)
class Patient:
    """One patient of the synthetic clinic, with the latent truth the pipeline never sees.

    Attributes:
        ref: hospital reference, ``"H"`` followed by 7 digits; unique.
        first_name: given name as written in the patient file.
        last_name: family name as written in the patient file.
        sex: ``"F"`` or ``"M"``.
        age: whole years at the study date.
        bmi: body-mass index, kg/m2, one decimal.
        height_m: height in metres, two decimals.
        weight_kg: weight in kilograms, one decimal.
        birth_date: birth date consistent with ``age`` at ``study_at``.
        study_at: date and time of the radiographic study.
        t_score: latent T-score (standard deviations from the young-adult mean).
    """

    ref: str
    first_name: str
    last_name: str
    sex: str
    age: int
    bmi: float
    height_m: float
    weight_kg: float
    birth_date: dt.date
    study_at: dt.datetime
    t_score: float

    @property
    def true_label(self) -> str:
        """WHO label of the latent T-score: ``"osteoporosis"`` or ``"normal"``."""
        return true_label(self.t_score)


def true_label(t_score: float) -> str:
    """Apply the WHO rule: a T-score at or below -2.5 is osteoporosis.

    Args:
        t_score: T-score in standard deviations.

    Returns:
        ``"osteoporosis"`` or ``"normal"``.
    """
    return OSTEOPOROSIS if t_score <= WHO_THRESHOLD else NORMAL


def expected_t_score(age: np.ndarray, sex: np.ndarray, bmi: np.ndarray) -> np.ndarray:
    """Mean T-score of patients of a given age, sex and BMI (without the individual term).

    Args:
        age: ages in years.
        sex: ``"F"``/``"M"`` per patient.
        bmi: body-mass indices.

    Returns:
        The expected T-scores, one per patient.
    """
    female = sex == "F"
    at_50 = np.where(female, T_AT_50["F"], T_AT_50["M"])
    loss = np.where(female, T_LOSS_PER_YEAR["F"], T_LOSS_PER_YEAR["M"])
    return at_50 - loss * (age - 50) + T_GAIN_PER_BMI * (bmi - REFERENCE_BMI)


def draw_patients(count: int, rng: np.random.Generator) -> list[Patient]:
    """Draw ``count`` patients of the screening population.

    Args:
        count: number of patients.
        rng: generator all draws come from.

    Returns:
        The patients, hospital references unique.
    """
    # 1. Sex, age, BMI, height and weight, and the latent T-score.
    sex, age, bmi, height, weight, t_score = draw_characteristics(count, rng)

    # 2. Identity: unique references, names, study date and a birth date matching the age.
    refs = rng.choice(9_000_000, size=count, replace=False) + 1_000_000
    patients = []
    for i in range(count):
        given = FIRST_NAMES_F if sex[i] == "F" else FIRST_NAMES_M
        study_at = _study_datetime(rng)
        patients.append(Patient(
            ref=f"H{refs[i]:07d}",
            first_name=given[rng.integers(len(given))],
            last_name=LAST_NAMES[rng.integers(len(LAST_NAMES))],
            sex=str(sex[i]),
            age=int(age[i]),
            bmi=float(bmi[i]),
            height_m=float(height[i]),
            weight_kg=float(weight[i]),
            birth_date=birth_date_for_age(study_at.date(), int(age[i]), int(rng.integers(365))),
            study_at=study_at,
            t_score=float(t_score[i]),
        ))
    return patients


def draw_characteristics(
    count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw the bodily characteristics and latent T-scores of ``count`` screened patients.

    Args:
        count: number of patients.
        rng: generator the draws come from.

    Returns:
        Arrays ``sex`` (``"F"``/``"M"``), ``age`` (whole years), ``bmi``, ``height`` (m),
        ``weight`` (kg) and ``t_score``, one value per patient.
    """

    # 1. Sex, age (right-skewed above 50), BMI (log-normal) and height (shrinking with age).
    sex = np.where(rng.random(count) < FEMALE_SHARE, "F", "M")
    age = np.minimum(50 + rng.gamma(2.2, 7.0, count), 95).astype(int)
    bmi = np.round(np.clip(rng.lognormal(np.log(REFERENCE_BMI), 0.16, count), 16.0, 55.0), 1)
    mean_height = np.where(sex == "F", 1.62, 1.76) - 0.0012 * (age - 50)
    height = np.round(mean_height + rng.normal(0.0, 0.065, count), 2)
    weight = np.round(bmi * height**2, 1)

    # 2. Latent T-score: age, sex and BMI effects plus the individual term.
    t_score = expected_t_score(age, sex, bmi) + rng.normal(0.0, T_INDIVIDUAL_SD, count)
    return sex, age, bmi, height, weight, t_score


def birth_date_for_age(on: dt.date, age: int, days_past_birthday: int) -> dt.date:
    """Return a birth date at which a person is ``age`` whole years old on date ``on``.

    Args:
        on: the reference date (the study date).
        age: age in whole years on that date.
        days_past_birthday: days since the last birthday, 0 to 364.

    Returns:
        The birth date.
    """
    try:
        birthday = on.replace(year=on.year - age)
    except ValueError:  # 29 February in a year without one
        birthday = on.replace(year=on.year - age, day=28)
    birth = birthday - dt.timedelta(days=days_past_birthday)
    return birth if age_on(birth, on) == age else birthday


def age_on(birth: dt.date, on: dt.date) -> int:
    """Whole years between ``birth`` and ``on``, the age DICOM and patient files record.

    Args:
        birth: birth date.
        on: reference date.

    Returns:
        Completed years of age.
    """
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def _study_datetime(rng: np.random.Generator) -> dt.datetime:
    """A weekday between 08:00 and 17:55 in the study period."""
    day = FIRST_STUDY_DAY + dt.timedelta(days=int(rng.integers(STUDY_DAYS)))
    while day.weekday() >= 5:
        day -= dt.timedelta(days=1)
    minute = int(rng.integers(8 * 60, 18 * 60, endpoint=False) // 5 * 5)
    second = int(rng.integers(60))
    return dt.datetime.combine(day, dt.time(minute // 60, minute % 60, second))
