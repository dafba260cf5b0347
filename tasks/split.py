"""Split stage: divide the prepared images into train, validation and test sets by patient.

Reads ``data/prepared/records.parquet``. Writes ``data/split/split.parquet`` (image_id,
patient_id, split in {train, val, test}) and the stage summary ``reports/split.json`` with the
size, osteoporosis ratio and sex ratio of every split.

Control 4.29, ensure that models are unbiased: every split keeps the osteoporosis ratio and the
sex ratio of the whole dataset within ``split.tolerance``, so that the model is trained on, and
its accuracy per sex measured on, samples that represent both sexes as the practice sees them.
A split that cannot meet the tolerance stops the run with a ``SplitError`` instead of producing a
skewed dataset. The split is also grouped by patient: all images of a patient land in the same
split, so test figures are never inflated by a patient the model has already seen.

Method: the images are stratified on the combined stratum label x sex and grouped by
patient_id with scikit-learn's ``StratifiedGroupKFold`` into k folds, where k is the smallest
count of equal folds that expresses ``split.fractions`` (10 for 80/10/10); the first folds form
the training set, the next the validation set and the last the test set. The folds are seeded
by ``split.seed`` and computed in an order set by the images' content (the sha256 of each
prepared pixel array), not by their pseudonyms. Pseudonyms are random and belong to one identity
vault, so a practice that rebuilds its vault, or a reviewer who reruns the demo on a fresh clone,
gets the same patients in the same splits from the same export and seed. The split table is
written in that order too, so training sees its images in the same order. The ingest stage
records each image's content key (``content_key``) when it makes the pixel array, so the split
reads no pixels.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from sklearn.model_selection import StratifiedGroupKFold

from osteo.config import ConfigError
from osteo.layout import Layout
from osteo.shards import stored_places
from osteo.summary import StageSummary
from osteo.tables import read_stage_input

logger = logging.getLogger(__name__)

STAGE = "split"
SPLITS = ("train", "val", "test")
POSITIVE_LABEL = "osteoporosis"
FEMALE = "F"
# The most folds tried to express the fractions; 20 allows steps of 5 %.
MAX_FOLDS = 20
REQUIRED_COLUMNS = ["image_id", "patient_id", "sex", "label", "shard", "member", "content_key"]


class SplitError(Exception):
    """The prepared images cannot be split as asked; the message says which split and why."""


# ---------------------------------------------------------------- settings


def fold_plan(fractions: Any) -> tuple[int, ...]:
    """How many of k equal folds each split gets, for the smallest k that fits the fractions.

    Args:
        fractions: the train, val and test fractions, summing to 1.

    Returns:
        The fold counts of train, val and test, e.g. ``(8, 1, 1)`` for ``[0.8, 0.1, 0.1]``.

    Raises:
        ConfigError: the fractions are not three positive numbers summing to 1, or no count of
            at most ``MAX_FOLDS`` folds expresses them.
    """
    valid = (
        isinstance(fractions, list | tuple) and len(fractions) == len(SPLITS)
        and all(isinstance(f, int | float) and not isinstance(f, bool) and f > 0
                for f in fractions)
    )
    if not valid or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ConfigError(
            f"params.yaml: split.fractions must be three positive numbers (train, val, test) "
            f"summing to 1, got {fractions!r}"
        )
    for folds in range(len(SPLITS), MAX_FOLDS + 1):
        counts = [fraction * folds for fraction in fractions]
        if all(abs(count - round(count)) < 1e-6 for count in counts):
            return tuple(round(count) for count in counts)
    raise ConfigError(
        f"params.yaml: split.fractions {fractions!r} must be multiples of 1/k for some k up to "
        f"{MAX_FOLDS} (e.g. [0.8, 0.1, 0.1] or [0.7, 0.15, 0.15])"
    )


def _settings(params: dict[str, Any]) -> tuple[tuple[int, ...], int, float]:
    """The fold plan, seed and tolerance from the ``split`` section of the parameters."""
    section = params.get(STAGE) or {}
    plan = fold_plan(section.get("fractions"))
    seed, tolerance = section.get("seed"), section.get("tolerance")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"params.yaml: split.seed must be a non-negative integer, got {seed!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or tolerance < 0:
        raise ConfigError(
            f"params.yaml: split.tolerance must be a number >= 0, got {tolerance!r}"
        )
    return plan, seed, float(tolerance)


# ---------------------------------------------------------------- the split


def assign_splits(
    records: pd.DataFrame, plan: tuple[int, ...], seed: int, keys: pd.Series | None = None
) -> pd.Series:
    """Assign every image to train, val or test, stratified on label x sex, grouped by patient.

    Args:
        records: one row per image with ``image_id``, ``patient_id``, ``sex`` and ``label``.
        plan: fold counts of train, val and test (see ``fold_plan``).
        seed: seed of the fold assignment.
        keys: an order key per image, indexed like ``records`` (``content_keys``); by default
            the image id. Patients are ordered and grouped by the smallest key of their images.

    Returns:
        The split name of each image, indexed like ``records``.

    Raises:
        SplitError: there are fewer patients than folds, or too few images in every stratum.
    """

    # 1. Fold the images in a fixed order, so that the input's row order does not matter.
    ordered = ordered_by_key(records, records["image_id"] if keys is None else keys)
    strata = ordered["label"].astype(str) + "|" + ordered["sex"].astype(str)
    folds = sum(plan)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)

    # 2. StratifiedGroupKFold yields each fold's images as its test indices, fold by fold.
    fold_of = np.empty(len(ordered), dtype=np.int64)
    try:
        with warnings.catch_warnings():
            # Sparse strata show up in the ratio check below, with the numbers that matter.
            warnings.filterwarnings("ignore", "The least populated class", UserWarning)
            for fold, (_, members) in enumerate(
                splitter.split(np.zeros(len(ordered)), strata, ordered["patient_key"])
            ):
                fold_of[members] = fold
    except ValueError as error:
        raise SplitError(
            f"cannot make {folds} patient-grouped folds from {ordered['patient_id'].nunique()} "
            f"patients and {len(ordered)} images: {error}"
        ) from None

    # 3. The first folds are the training set, then validation, then test.
    names = np.repeat(np.array(SPLITS), plan)
    return pd.Series(names[fold_of], index=ordered.index, name="split").reindex(records.index)


def content_keys(records: pd.DataFrame, pixel_dir: Path) -> pd.Series:
    """The content key of each image, checked to name an image of the prepared shards.

    The key is the sha256 of the image's prepared pixel array, which the ingest stage records
    (``content_key``) as it makes the array; only the shards' member lists are read.

    Args:
        records: one row per image with ``image_id``, ``shard``, ``member`` and ``content_key``.
        pixel_dir: data/prepared/pixels.

    Raises:
        SplitError: when an image of the records is in none of the shards.
    """
    stored = stored_places(pixel_dir)
    located = zip(records["shard"].astype(str), records["member"].astype(str), strict=True)
    missing = sorted(image_id for image_id, place in zip(records["image_id"], located,
                                                          strict=True)
                     if place not in stored)
    if missing:
        raise SplitError(f"{pixel_dir} lacks {len(missing)} prepared image(s), the first "
                         f"{missing[0]}: run the preprocess stage again")
    return records["content_key"].rename("key")


def ordered_by_key(records: pd.DataFrame, keys: pd.Series) -> pd.DataFrame:
    """The records sorted by patient then image order key, with a ``patient_key`` column.

    A patient's key is the smallest key of its images, so the order depends on the keys only,
    never on the pseudonyms.
    """
    keyed = records.assign(key=keys.to_numpy()).sort_values("key", kind="stable")
    smallest = keyed.drop_duplicates("patient_id").set_index("patient_id")["key"]
    keyed["patient_key"] = keyed["patient_id"].map(smallest)
    return keyed.sort_values(["patient_key", "key"], kind="stable").drop(columns="key")


def split_statistics(records: pd.DataFrame, splits: pd.Series) -> dict[str, dict[str, Any]]:
    """Images, patients, share of images, osteoporosis ratio and female ratio per split.

    Args:
        records: one row per image with ``patient_id``, ``sex`` and ``label``.
        splits: the split name of each image, indexed like ``records``.

    Returns:
        A mapping from ``all`` and each split name to its figures.
    """
    statistics: dict[str, dict[str, Any]] = {}
    for name in ("all", *SPLITS):
        members = records if name == "all" else records[splits == name]
        statistics[name] = {
            "images": len(members),
            "patients": int(members["patient_id"].nunique()),
            "fraction": round(len(members) / max(len(records), 1), 4),
            "osteoporosis_ratio": _share(members["label"] == POSITIVE_LABEL),
            "female_ratio": _share(members["sex"] == FEMALE),
        }
    return statistics


def _share(flags: pd.Series) -> float | None:
    return round(float(flags.mean()), 4) if len(flags) else None


def check_split(
    records: pd.DataFrame, splits: pd.Series, statistics: dict[str, dict[str, Any]],
    tolerance: float,
) -> None:
    """Refuse a split that leaks patients, leaves a split empty or skews a ratio.

    Args:
        records: one row per image with ``patient_id``.
        splits: the split name of each image, indexed like ``records``.
        statistics: the figures of ``split_statistics``.
        tolerance: the largest absolute difference allowed between a split's osteoporosis or
            female ratio and the whole dataset's.

    Raises:
        SplitError: naming the split and the figure that failed.
    """
    leaking = int((splits.groupby(records["patient_id"]).nunique() > 1).sum())
    if leaking:
        raise SplitError(f"{leaking} patient(s) have images in more than one split")
    whole = statistics["all"]
    for name in SPLITS:
        figures = statistics[name]
        if figures["images"] == 0:
            raise SplitError(
                f"the {name} split is empty: {whole['patients']} patients are too few for "
                "the split fractions"
            )
        for ratio in ("osteoporosis_ratio", "female_ratio"):
            if abs(figures[ratio] - whole[ratio]) > tolerance + 1e-9:
                raise SplitError(
                    f"the {name} split's {ratio.replace('_', ' ')} is {figures[ratio]:.3f} "
                    f"against {whole[ratio]:.3f} overall, beyond split.tolerance {tolerance}: "
                    "add images, change split.seed or widen the tolerance"
                )


# ---------------------------------------------------------------- the stage


@task(name=STAGE)
def split(layout: Layout, params: dict[str, Any]) -> StageSummary:
    """Split the prepared images into train, val and test, stratified and grouped by patient.

    Args:
        layout: the project's paths.
        params: the parsed ``params.yaml``; uses ``split.fractions``, ``split.seed`` and
            ``split.tolerance``.

    Returns:
        The stage summary (unit ``image``), also written to ``reports/split.json``.

    Raises:
        ConfigError: a ``split`` setting is missing or unusable.
        SplitError: the prepared records are missing or cannot be split within the tolerance.
    """

    # 1. Read the settings and the prepared records.
    plan, seed, tolerance = _settings(params)
    records = _read_records(layout.prepared_records)
    keys = content_keys(records, layout.prepared_pixel_dir)

    # 2. Split, then check leakage, emptiness and ratios before writing anything.
    splits = assign_splits(records, plan, seed, keys)
    statistics = split_statistics(records, splits)
    check_split(records, splits, statistics, tolerance)

    # 3. Write the split table, in content order, and the summary.
    layout.split_dir.mkdir(parents=True, exist_ok=True)
    table = records[["image_id", "patient_id"]].assign(split=splits.to_numpy())
    table = table.loc[ordered_by_key(records, keys).index]
    table.to_parquet(layout.split_table, index=False)
    summary = StageSummary(
        stage=STAGE, records_in=len(records), accepted=len(table), unit="image",
        outputs={"split": str(layout.split_table.relative_to(layout.root))},
        extra={"seed": seed, "folds": list(plan), "tolerance": tolerance, **statistics},
    )
    summary.write(layout.summary(STAGE))
    logger.info("split: %s", ", ".join(
        f"{name} {statistics[name]['images']} images / {statistics[name]['patients']} patients "
        f"(osteoporosis {statistics[name]['osteoporosis_ratio']:.3f}, "
        f"female {statistics[name]['female_ratio']:.3f})" for name in ("all", *SPLITS)))
    return summary


def _read_records(path: Path) -> pd.DataFrame:
    """The prepared records, checked for the columns and rows a split needs."""
    records = read_stage_input(path, REQUIRED_COLUMNS, SplitError, "preprocess")
    if records.empty:
        raise SplitError(f"{path} holds no images: nothing to split")
    return records.reset_index(drop=True)
