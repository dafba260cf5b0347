"""Evaluate stage: how well the model finds osteoporosis, for whom, and whether that is enough.

The model's predictions on the held-out splits are turned into the evidence a radiologist,
a data scientist and an auditor need before the model may assist anyone:

1. the decision threshold is chosen on the VALIDATION split, as the highest probability that
   still flags at least ``evaluate.target_recall`` of the osteoporosis cases (missing a case
   costs more than a second look at a normal radiograph), with scikit-learn's ROC curve. A
   validation split holds few cases (about twenty in the demo), so the recall it shows at a
   threshold is itself uncertain; with ``evaluate.threshold_confidence`` the threshold is the
   highest at which the true recall reaches the target with that probability (Beta posterior
   of the recall, uniform prior), rather than the highest at which the observed recall does;
2. on the TEST split, at that threshold: accuracy, precision, recall, F1, specificity and ROC
   AUC (torchmetrics' functional metrics), each with a percentile bootstrap 95% confidence
   interval, and the confusion matrix (scikit-learn);
3. the same metrics per sex with fairlearn's ``MetricFrame`` and the gap between the sexes
   (control 4.29, ensure that models are unbiased);
4. for a synthetic export, the oracle: how well the simulated T-score itself ranks the test
   labels, the ceiling the model is compared with;
5. the accuracy criteria of ``params.yaml`` (control 4.25, define accuracy criteria): the model
   is accepted or rejected, with one sentence per failed criterion.

Reads ``data/model/predictions.parquet`` (image_id, patient_id, split, sex, label, probability),
optionally ``data/oracle/ground_truth.parquet`` (synthetic exports), and, for the dataset
counts of the model card, ``data/split/split.parquet`` and ``data/prepared/records.parquet``.
Writes ``reports/metrics.json`` (for ``dvc metrics show``), ``reports/plots/roc.png``,
``pr.png`` and their tables ``roc.csv`` (fpr, tpr) and ``pr.csv`` (recall, precision) for
``dvc plots``.

Bootstrap: the resampling unit is the PATIENT. A patient contributes one or two radiographs
whose predictions are correlated; drawing images independently would understate the width of
the intervals. The threshold stays fixed at its validation value in every resample.

Everything written is an aggregate: no image or patient identifier leaves this stage.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from fairlearn.metrics import MetricFrame, selection_rate
from matplotlib.figure import Figure
from prefect import task
from scipy import special
from sklearn.metrics import (
    confusion_matrix,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_f1_score,
    binary_precision,
    binary_recall,
    binary_specificity,
)

from osteo.config import ConfigError
from osteo.layout import Layout

logger = logging.getLogger(__name__)

PREDICTIONS = Path("data/model/predictions.parquet")
GROUND_TRUTH = Path("data/oracle/ground_truth.parquet")
SPLIT_TABLE = Path("data/split/split.parquet")
PREPARED_RECORDS = Path("data/prepared/records.parquet")
METRICS = Path("reports/metrics.json")
PLOTS = Path("reports/plots")

PREDICTION_COLUMNS = ("image_id", "patient_id", "split", "sex", "label", "probability")
SEXES = ("F", "M")
SPLITS = ("train", "val", "test")
TEST_METRICS = ("auc", "recall", "precision", "f1", "accuracy", "specificity")
GROUP_METRICS = ("recall", "precision", "selection_rate", "auc")
# Statistics that get a bootstrap interval: the test metrics, recall and AUC per sex, the gap.
INTERVAL_STATISTICS = (*TEST_METRICS, "recall_F", "recall_M", "auc_F", "auc_M", "recall_F_minus_M")
# An interval is reported only when the statistic is defined in this share of the resamples.
MIN_DEFINED_SHARE = 0.9


class EvaluationError(Exception):
    """The predictions cannot be evaluated; the message names the file, the row or the split."""


@dataclass(frozen=True)
class EvaluationSettings:
    """The ``evaluate`` block of ``params.yaml``.

    Attributes:
        target_recall: recall the threshold must reach on the validation split, in (0, 1].
        threshold_confidence: probability with which the true recall must reach the target at
            the chosen threshold, in [0.5, 1); None takes the observed validation recall as it
            is.
        bootstrap: number of bootstrap resamples (0 disables the intervals).
        seed: seed of the bootstrap's random generator.
    """

    target_recall: float = 0.90
    threshold_confidence: float | None = None
    bootstrap: int = 1000
    seed: int = 0

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> EvaluationSettings:
        """Read the settings, with defaults for missing keys.

        Raises:
            ConfigError: when a value is out of range.
        """
        block = params.get("evaluate") or {}
        confidence = _optional_fraction(block.get("threshold_confidence"))
        settings = cls(
            target_recall=float(block.get("target_recall", cls.target_recall)),
            threshold_confidence=confidence,
            bootstrap=int(block.get("bootstrap", cls.bootstrap)),
            seed=int(block.get("seed", cls.seed)),
        )
        if not 0.0 < settings.target_recall <= 1.0:
            raise ConfigError(
                f"params.yaml: evaluate.target_recall must be in (0, 1], "
                f"got {settings.target_recall}"
            )
        if confidence is not None and not 0.5 <= confidence < 1.0:
            raise ConfigError(
                "params.yaml: evaluate.threshold_confidence must be in [0.5, 1) or null, "
                f"got {confidence}"
            )
        if settings.bootstrap < 0:
            raise ConfigError(
                f"params.yaml: evaluate.bootstrap must be >= 0, got {settings.bootstrap}"
            )
        return settings


def _optional_fraction(value: Any) -> float | None:
    """``evaluate.threshold_confidence`` as a number, or None when it is not set."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"params.yaml: evaluate.threshold_confidence must be a number or null, got {value!r}"
        ) from None


@dataclass(frozen=True)
class Criteria:
    """Accuracy criteria a model must meet to be accepted (control 4.25).

    Attributes:
        min_auc: lowest acceptable test ROC AUC.
        min_recall: lowest acceptable test recall (sensitivity) at the chosen threshold.
        max_sex_gap: largest acceptable difference of test recall between women and men.
    """

    min_auc: float
    min_recall: float
    max_sex_gap: float

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Criteria:
        """Read the ``criteria`` block; every key is required.

        Raises:
            ConfigError: when the block or one of its keys is missing or not a number.
        """
        block = params.get("criteria") or {}
        values: dict[str, float] = {}
        for key in ("min_auc", "min_recall", "max_sex_gap"):
            if key not in block:
                raise ConfigError(
                    f"params.yaml: criteria.{key} is missing; a model cannot be accepted "
                    "without its accuracy criteria"
                )
            try:
                values[key] = float(block[key])
            except (TypeError, ValueError):
                raise ConfigError(
                    f"params.yaml: criteria.{key} must be a number, got {block[key]!r}"
                ) from None
        return cls(**values)


@dataclass(frozen=True)
class ThresholdChoice:
    """The operating point chosen on the validation split.

    Attributes:
        threshold: an image is flagged when its probability is >= this value.
        recall: recall reached on the validation split.
        specificity: specificity on the validation split at that threshold.
        confidence: posterior probability that the true recall at that threshold reaches the
            target (uniform prior), given the validation cases it flags.
    """

    threshold: float
    recall: float
    specificity: float
    confidence: float


@dataclass
class EvaluationResult:
    """What the evaluate stage decided and wrote.

    Attributes:
        threshold: decision threshold chosen on the validation split.
        accepted: True when every accuracy criterion is met.
        reasons: one sentence per failed criterion (empty when accepted).
        metrics: the document written to ``reports/metrics.json``.
        outputs: where the outputs went, by name.
    """

    threshold: float
    accepted: bool
    reasons: list[str]
    metrics: dict[str, Any]
    outputs: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- the stage


@task(name="evaluate")
def evaluate(layout: Layout, params: dict[str, Any]) -> EvaluationResult:
    """Evaluate the model's predictions, check the accuracy criteria and write the reports.

    Args:
        layout: paths of the project.
        params: the parameters of ``params.yaml`` (blocks ``evaluate`` and ``criteria``).

    Returns:
        The threshold, the acceptance decision with its reasons, the metrics document and the
        paths written.

    Raises:
        ConfigError: when the ``evaluate`` or ``criteria`` block is unusable.
        EvaluationError: when the predictions or the ground truth cannot be evaluated.
    """
    started = time.monotonic()

    # 1. Settings and inputs.
    settings = EvaluationSettings.from_params(params)
    criteria = Criteria.from_params(params)
    predictions = read_predictions(layout.root / PREDICTIONS)
    val = predictions[predictions["split"] == "val"]
    test = predictions[predictions["split"] == "test"]
    _require_both_classes(val, "val", layout.root / PREDICTIONS)
    if test.empty:
        raise EvaluationError(f"{layout.root / PREDICTIONS}: the test split has no prediction")

    # 2. Operating point on the validation split, measured on the test split.
    choice = choose_threshold(val["label"].to_numpy(), val["probability"].to_numpy(),
                              settings.target_recall, settings.threshold_confidence)
    document = metrics_document(test, choice, settings)
    document["val"] |= {"n_images": len(val), "n_positive": int(val["label"].sum())}

    # 3. Oracle, dataset counts, acceptance.
    truth = read_ground_truth(layout.root / GROUND_TRUTH)
    document["synthetic"] = truth is not None
    document["oracle"] = oracle_metrics(test, truth)
    document["dataset"] = dataset_counts(layout.root, predictions)
    accepted, reasons, checks = check_criteria(document, criteria)
    document["acceptance"] = {
        "accepted": accepted, "reasons": reasons, "checks": checks,
        "criteria": {"min_auc": criteria.min_auc, "min_recall": criteria.min_recall,
                     "max_sex_gap": criteria.max_sex_gap},
    }

    # 4. Reports.
    outputs = write_curves(test, choice.threshold, layout.root / PLOTS)
    metrics_path = layout.root / METRICS
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(document, indent=2) + "\n")
    outputs["metrics"] = str(metrics_path)
    _log_outcome(document, time.monotonic() - started)
    return EvaluationResult(choice.threshold, accepted, reasons, document, outputs)


def metrics_document(
    test: pd.DataFrame, choice: ThresholdChoice, settings: EvaluationSettings
) -> dict[str, Any]:
    """Measure the test split at the chosen threshold: overall, per sex, with intervals.

    Args:
        test: the test rows of the predictions table.
        choice: the operating point chosen on the validation split.
        settings: target recall and bootstrap settings.

    Returns:
        The metrics part of ``reports/metrics.json`` (keys are always present; undefined
        values are ``null`` and explained in ``notes``).
    """
    labels = test["label"].to_numpy()
    probabilities = test["probability"].to_numpy()
    sexes = test["sex"].to_numpy()
    flagged = (probabilities >= choice.threshold).astype(int)
    by_sex, gaps, notes = metrics_by_sex(labels, probabilities, sexes, choice.threshold)
    intervals, defined = bootstrap_intervals(
        labels, probabilities, sexes, test["patient_id"].to_numpy(), choice.threshold,
        settings.bootstrap, settings.seed,
    )
    notes += _interval_notes(defined, settings.bootstrap)
    tn, fp, fn, tp = confusion_matrix(labels, flagged, labels=[0, 1]).ravel()
    return {
        "threshold": _number(choice.threshold),
        "target_recall": settings.target_recall,
        "threshold_confidence": settings.threshold_confidence,
        "val": {"recall": _number(choice.recall), "specificity": _number(choice.specificity),
                "recall_confidence": _number(choice.confidence)},
        "test": _named_numbers(threshold_metrics(labels, probabilities, choice.threshold))
        | {"n_images": len(test), "n_patients": int(test["patient_id"].nunique()),
           "n_positive": int(labels.sum())},
        "ci95": intervals,
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
        "by_sex": by_sex,
        "sex_gap": gaps,
        "bootstrap": {"resamples": settings.bootstrap, "unit": "patient", "seed": settings.seed},
        "notes": notes,
    }


# ---------------------------------------------------------------- inputs


def read_predictions(path: Path) -> pd.DataFrame:
    """Read and check the predictions table of the train stage.

    Every row must be usable: evaluating on a silently reduced test split would report
    numbers for a population nobody chose, so a bad row stops the stage with its row number
    (1-based, in file order).

    Raises:
        EvaluationError: when the file is missing, a column is missing, a row holds an
            unusable value, or an image appears twice.
    """
    if not path.exists():
        raise EvaluationError(f"{path} not found: run the train stage first")
    frame = pd.read_parquet(path)
    missing = [column for column in PREDICTION_COLUMNS if column not in frame.columns]
    if missing:
        raise EvaluationError(f"{path}: missing column(s) {', '.join(missing)}")
    frame = frame.reset_index(drop=True)
    probabilities = pd.to_numeric(frame["probability"], errors="coerce")
    checks = {
        "split is not 'val' or 'test'": ~frame["split"].isin(["val", "test"]),
        "sex is not 'F' or 'M'": ~frame["sex"].isin(SEXES),
        "label is not 0 or 1": ~frame["label"].isin([0, 1]),
        "probability is not a number in [0, 1]": ~probabilities.between(0.0, 1.0),
        "image_id appears more than once": frame["image_id"].duplicated(keep="first"),
    }
    for problem, bad in checks.items():
        if bad.any():
            rows = np.flatnonzero(bad.to_numpy()) + 1
            raise EvaluationError(
                f"{path}: row {rows[0]}: {problem} ({len(rows)} row(s) affected)"
            )
    return frame.assign(label=frame["label"].astype(int), probability=probabilities)


def read_ground_truth(path: Path) -> pd.DataFrame | None:
    """Read the oracle of a synthetic export, or None when the export is not synthetic.

    Raises:
        EvaluationError: when the file exists but lacks a column.
    """
    if not path.exists():
        return None
    frame = pd.read_parquet(path)
    missing = [c for c in ("image_id", "t_score", "true_label") if c not in frame.columns]
    if missing:
        raise EvaluationError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame


def _require_both_classes(frame: pd.DataFrame, split: str, path: Path) -> None:
    if frame.empty:
        raise EvaluationError(f"{path}: the {split} split has no prediction")
    if frame["label"].nunique() < 2:
        present = "osteoporosis" if frame["label"].iloc[0] == 1 else "normal"
        raise EvaluationError(
            f"{path}: the {split} split holds only {present} cases; a threshold cannot be "
            "chosen for a recall target without both classes"
        )


# ---------------------------------------------------------------- metrics


def choose_threshold(
    labels: np.ndarray, probabilities: np.ndarray, target_recall: float,
    confidence: float | None = None,
) -> ThresholdChoice:
    """Choose the highest threshold whose recall reaches ``target_recall``.

    An image is flagged when its probability is >= the threshold. Candidates are the observed
    probabilities (scikit-learn's ``roc_curve``), whose recall never decreases as the
    threshold falls, so the first candidate meeting the rule is the highest.

    Without ``confidence`` the rule is that the observed recall reaches the target. With it,
    the rule is that the true recall does with at least that probability: flagging ``k`` of
    the ``n`` cases gives the recall a Beta(k + 1, n - k + 1) posterior, whose mass above the
    target must reach ``confidence``. When no threshold gives that confidence (very few
    cases), the one flagging every case is taken.

    Args:
        labels: 1 for osteoporosis, 0 for normal; both classes must be present.
        probabilities: predicted P(osteoporosis).
        target_recall: recall to reach, in (0, 1].
        confidence: required probability that the true recall reaches the target, or None.

    Returns:
        The threshold with its recall, specificity and confidence on these labels.
    """
    fpr, tpr, thresholds = roc_curve(labels, probabilities, drop_intermediate=False)
    cases = int(np.sum(labels == 1))
    flagged_cases = np.rint(tpr * cases)
    posterior = special.betaincc(flagged_cases + 1, cases - flagged_cases + 1, target_recall)
    meets = (tpr >= target_recall - 1e-12) if confidence is None else (posterior >= confidence)
    index = int(np.argmax(meets)) if meets.any() else int(np.argmax(tpr >= 1.0))
    threshold = float(min(thresholds[index], 1.0))
    flagged = (probabilities >= threshold).astype(int)
    return ThresholdChoice(
        threshold=threshold,
        recall=float(recall_score(labels, flagged)),
        specificity=float(recall_score(labels, flagged, pos_label=0)),
        confidence=float(posterior[index]),
    )


def threshold_metrics(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float
) -> dict[str, float]:
    """Accuracy, precision, recall, F1, specificity and AUC at a threshold.

    Computed with torchmetrics' functional metrics, with their argument checks off (the inputs
    were checked when read), so that thousands of bootstrap resamples stay fast. A metric
    whose denominator is empty is NaN, not torchmetrics' 0: recall needs an osteoporosis case,
    specificity a normal case, precision a flagged image, AUC both classes.

    Args:
        labels: 1 for osteoporosis, 0 for normal.
        probabilities: predicted P(osteoporosis).
        threshold: an image is flagged when its probability is >= this value.

    Returns:
        The six metrics by name, NaN when undefined.
    """
    target = torch.as_tensor(labels, dtype=torch.long)
    flagged = torch.as_tensor(probabilities >= threshold, dtype=torch.long)
    positives, total, flags = int(target.sum()), len(target), int(flagged.sum())
    metric = partial(_defined, preds=flagged, target=target)
    return {
        "auc": _auc(labels, probabilities),
        "recall": metric(binary_recall, positives > 0),
        "precision": metric(binary_precision, flags > 0),
        "f1": metric(binary_f1_score, positives > 0 or flags > 0),
        "accuracy": metric(binary_accuracy, total > 0),
        "specificity": metric(binary_specificity, positives < total),
    }


def _defined(function: Callable[..., Any], defined: bool, preds: Any, target: Any) -> float:
    if not defined:
        return math.nan
    return float(function(preds, target, validate_args=False))


def metrics_by_sex(
    labels: np.ndarray, probabilities: np.ndarray, sexes: np.ndarray, threshold: float
) -> tuple[dict[str, dict[str, Any]], dict[str, float | None], list[str]]:
    """Recall, precision, selection rate and AUC per sex, and the gap between the sexes.

    The gap is fairlearn's between-groups difference (max - min). It is ``None`` when the
    metric is undefined for a sex, because a difference over the remaining sex alone would
    read as a perfect 0.

    Args:
        labels: 1 for osteoporosis, 0 for normal.
        probabilities: predicted P(osteoporosis).
        sexes: ``F`` or ``M`` per image.
        threshold: decision threshold.

    Returns:
        Metrics per sex (with image and case counts), the gap per metric, and one note per
        undefined value saying why.
    """
    sex = pd.Series(sexes, name="sex")
    flagged = (probabilities >= threshold).astype(int)
    decisions = MetricFrame(
        metrics={"recall": partial(recall_score, zero_division=np.nan),
                 "precision": partial(precision_score, zero_division=np.nan),
                 "selection_rate": selection_rate},
        y_true=labels, y_pred=flagged, sensitive_features=sex,
    )
    ranking = MetricFrame(metrics={"auc": _auc}, y_true=labels, y_pred=probabilities,
                          sensitive_features=sex)
    table = pd.concat([decisions.by_group, ranking.by_group], axis=1).reindex(list(SEXES))
    differences = pd.concat([decisions.difference(), ranking.difference()])
    gaps = {
        metric: None if table[metric].isna().any() else _number(differences[metric])
        for metric in GROUP_METRICS
    }
    by_sex: dict[str, dict[str, Any]] = {}
    for group in SEXES:
        members = sexes == group
        by_sex[group] = {metric: _number(table.loc[group, metric]) for metric in GROUP_METRICS}
        by_sex[group] |= {"n_images": int(members.sum()),
                          "n_positive": int(labels[members].sum())}
    return by_sex, gaps, _group_notes(by_sex, gaps)


def _group_notes(
    by_sex: dict[str, dict[str, Any]], gaps: dict[str, float | None]
) -> list[str]:
    notes = []
    for group, values in by_sex.items():
        n_images, n_positive = values["n_images"], values["n_positive"]
        if n_images == 0:
            notes.append(f"sex {group}: no test image, so no metric is defined for this group")
            continue
        if n_positive == 0:
            notes.append(f"sex {group}: no osteoporosis case in the test split, so recall and "
                         "AUC are undefined (null)")
        elif n_positive == n_images:
            notes.append(f"sex {group}: only osteoporosis cases in the test split, so AUC is "
                         "undefined (null)")
        if values["precision"] is None and n_positive > 0:
            notes.append(f"sex {group}: no image flagged at the threshold, so precision is "
                         "undefined (null)")
    undefined = [metric for metric, gap in gaps.items() if gap is None]
    if undefined:
        notes.append(f"gap between sexes undefined for {', '.join(undefined)}: the metric is "
                     "missing for at least one sex")
    return notes


def bootstrap_intervals(
    labels: np.ndarray, probabilities: np.ndarray, sexes: np.ndarray, patients: np.ndarray,
    threshold: float, resamples: int, seed: int,
) -> tuple[dict[str, dict[str, float | None]], dict[str, int]]:
    """Percentile bootstrap 95% intervals, resampling patients with replacement.

    Each resample draws as many patients as the test split holds and takes all their images.
    A statistic undefined in a resample (e.g. AUC when it holds one class) is left out of that
    resample; its interval is reported only when it is defined in at least
    ``MIN_DEFINED_SHARE`` of the resamples.

    Limitation: the threshold is held at its validation value, so the intervals do not
    include the uncertainty of choosing it.

    Args:
        labels: 1 for osteoporosis, 0 for normal.
        probabilities: predicted P(osteoporosis).
        sexes: ``F`` or ``M`` per image.
        patients: pseudonymous patient id per image (only used to group images).
        threshold: decision threshold.
        resamples: number of resamples; 0 gives null intervals.
        seed: seed of the random generator, so a rerun gives the same intervals.

    Returns:
        ``{statistic: {"low": ..., "high": ...}}`` and the number of resamples in which each
        statistic was defined.
    """
    rng = np.random.default_rng(seed)
    codes, uniques = pd.factorize(patients)
    order = np.argsort(codes, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(codes, minlength=len(uniques)))[:-1])
    samples = np.full((resamples, len(INTERVAL_STATISTICS)), np.nan)
    for row in range(resamples):
        chosen = rng.integers(0, len(uniques), size=len(uniques))
        index = np.concatenate([members[patient] for patient in chosen])
        statistics = _resample_statistics(labels[index], probabilities[index], sexes[index],
                                          threshold)
        samples[row] = [statistics[name] for name in INTERVAL_STATISTICS]
    defined = {name: int(np.isfinite(samples[:, i]).sum())
               for i, name in enumerate(INTERVAL_STATISTICS)}
    intervals = {name: _interval(samples[:, i], resamples)
                 for i, name in enumerate(INTERVAL_STATISTICS)}
    return intervals, defined


def _resample_statistics(
    labels: np.ndarray, probabilities: np.ndarray, sexes: np.ndarray, threshold: float
) -> dict[str, float]:
    statistics = threshold_metrics(labels, probabilities, threshold)
    for group in SEXES:
        target = torch.as_tensor(labels[sexes == group], dtype=torch.long)
        flagged = torch.as_tensor(probabilities[sexes == group] >= threshold, dtype=torch.long)
        statistics[f"recall_{group}"] = _defined(binary_recall, bool(target.sum() > 0),
                                                 flagged, target)
        statistics[f"auc_{group}"] = _auc(labels[sexes == group],
                                          probabilities[sexes == group])
    statistics["recall_F_minus_M"] = statistics["recall_F"] - statistics["recall_M"]
    return statistics


def _interval(values: np.ndarray, resamples: int) -> dict[str, float | None]:
    finite = values[np.isfinite(values)]
    if resamples == 0 or len(finite) < MIN_DEFINED_SHARE * resamples:
        return {"low": None, "high": None}
    low, high = np.percentile(finite, [2.5, 97.5])
    return {"low": _number(low), "high": _number(high)}


def _interval_notes(defined: dict[str, int], resamples: int) -> list[str]:
    if resamples == 0:
        return ["bootstrap disabled (evaluate.bootstrap = 0): no confidence interval"]
    return [
        f"95% interval of {name} not reported: defined in only {count} of {resamples} "
        "resamples (a sex or a class is too rare in the test split)"
        for name, count in defined.items() if count < MIN_DEFINED_SHARE * resamples
    ]


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of probabilities (torchmetrics), or NaN when the labels hold a single class."""
    target = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if target.numel() == 0 or bool(target.min() == target.max()):
        return math.nan
    preds = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    return float(binary_auroc(preds, target, validate_args=False))


# ---------------------------------------------------------------- oracle and dataset


def oracle_metrics(test: pd.DataFrame, truth: pd.DataFrame | None) -> dict[str, Any]:
    """Compare the model with the simulated T-score on the test images (synthetic exports).

    The oracle ranks images by ``-t_score`` (a lower T-score means less bone) against the
    labels the model is evaluated on, i.e. the readers' labels, so it is the ceiling a model
    can reach on these labels from the bone itself. ``auc_gap`` is model AUC - oracle AUC on
    the same images. ``label_agreement`` is the share of test labels equal to the true label.

    Args:
        test: the test rows of the predictions table.
        truth: the ground truth table, or None for a real export.

    Returns:
        ``auc``, ``model_auc``, ``auc_gap``, ``label_agreement`` (null when unavailable) and
        ``n_images``, the test images that have a T-score.
    """
    empty: dict[str, Any] = {"auc": None, "model_auc": None, "auc_gap": None,
                             "label_agreement": None, "n_images": 0}
    if truth is None:
        return empty
    matched = test.merge(truth[["image_id", "t_score", "true_label"]], on="image_id",
                         how="inner")
    matched = matched[np.isfinite(pd.to_numeric(matched["t_score"], errors="coerce"))]
    if matched.empty:
        return empty
    labels = matched["label"].to_numpy()
    # T-scores are not probabilities: scikit-learn ranks them as they are.
    oracle = (float(roc_auc_score(labels, -matched["t_score"].to_numpy(dtype=float)))
              if len(np.unique(labels)) == 2 else math.nan)
    model = _auc(labels, matched["probability"].to_numpy())
    return {
        "auc": _number(oracle),
        "model_auc": _number(model),
        "auc_gap": _number(model - oracle),
        "label_agreement": _number(float((_as_binary(matched["true_label"])
                                          == matched["label"]).mean())),
        "n_images": len(matched),
    }


def dataset_counts(root: Path, predictions: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Images, patients, prevalence and share of women per split, for the model card.

    Validation and test come from the predictions; the training split from the split table
    joined with the prepared records, when both are present (null otherwise).
    """
    counts = {split: _split_counts(predictions[predictions["split"] == split])
              for split in ("val", "test")}
    counts["train"] = {"n_images": None, "n_patients": None, "prevalence": None,
                       "female_share": None}
    if (root / SPLIT_TABLE).exists():
        split = pd.read_parquet(root / SPLIT_TABLE)
        train = split[split["split"] == "train"]
        if (root / PREPARED_RECORDS).exists():
            records = pd.read_parquet(root / PREPARED_RECORDS, columns=["image_id", "sex",
                                                                        "label"])
            train = train.merge(records, on="image_id", how="left")
            train = train.assign(label=_as_binary(train["label"]))
        counts["train"] = _split_counts(train)
    return {split: counts[split] for split in SPLITS}


def _split_counts(frame: pd.DataFrame) -> dict[str, Any]:
    def share(column: str, value: Any) -> float | None:
        if column not in frame.columns or frame.empty or frame[column].isna().any():
            return None
        return _number(float((frame[column] == value).mean()))

    return {
        "n_images": len(frame),
        "n_patients": int(frame["patient_id"].nunique()),
        "prevalence": share("label", 1),
        "female_share": share("sex", "F"),
    }


# ---------------------------------------------------------------- criteria


def check_criteria(
    document: dict[str, Any], criteria: Criteria
) -> tuple[bool, list[str], list[dict[str, Any]]]:
    """Decide acceptance against the accuracy criteria (control 4.25).

    Criteria are checked on the test point estimates. A metric that is undefined fails its
    criterion: a model whose fairness cannot be shown is not accepted.

    Args:
        document: the metrics document (``test`` and ``sex_gap`` blocks).
        criteria: the limits.

    Returns:
        Whether the model is accepted, one human-readable reason per failed criterion, and
        every check as ``{criterion, metric, value, limit, passed}``.
    """
    checks: list[tuple[str, str, float | None, float, Callable[[float, float], bool]]] = [
        ("min_auc", "test AUC", document["test"]["auc"], criteria.min_auc,
         lambda value, limit: value >= limit),
        ("min_recall", "test recall", document["test"]["recall"], criteria.min_recall,
         lambda value, limit: value >= limit),
        ("max_sex_gap", "recall gap between sexes", document["sex_gap"]["recall"],
         criteria.max_sex_gap, lambda value, limit: value <= limit),
    ]
    results, reasons = [], []
    for criterion, metric, value, limit, holds in checks:
        passed = value is not None and holds(value, limit)
        results.append({"criterion": criterion, "metric": metric, "value": value,
                        "limit": limit, "passed": passed})
        if not passed:
            reasons.append(_reason(criterion, metric, value, limit, document))
    return not reasons, reasons, results


def _reason(
    criterion: str, metric: str, value: float | None, limit: float, document: dict[str, Any]
) -> str:
    if value is None:
        return (f"{metric} is undefined on the test split (see notes), so criteria.{criterion} "
                f"({limit:.3f}) cannot be shown to hold")
    if criterion == "max_sex_gap":
        recall = {sex: document["by_sex"][sex]["recall"] for sex in SEXES}
        return (f"{metric} is {value:.3f} (F {recall['F']:.3f}, M {recall['M']:.3f}), above "
                f"the maximum {limit:.3f} (criteria.{criterion})")
    return f"{metric} is {value:.3f}, below the minimum {limit:.3f} (criteria.{criterion})"


# ---------------------------------------------------------------- reports


def write_curves(test: pd.DataFrame, threshold: float, directory: Path) -> dict[str, str]:
    """Write the test ROC and precision-recall curves as PNG figures and CSV tables.

    The CSV tables (``roc.csv``: fpr, tpr; ``pr.csv``: recall, precision) are the overall
    curves for ``dvc plots``; the figures add one curve per sex and mark the operating point.

    Returns:
        The path of each file written, by name.
    """
    directory.mkdir(parents=True, exist_ok=True)
    labels, probabilities = test["label"].to_numpy(), test["probability"].to_numpy()
    fpr, tpr, precision, recall = (np.empty(0) for _ in range(4))
    if len(np.unique(labels)) == 2:  # with a single class the curves are undefined: empty tables
        fpr, tpr, _ = roc_curve(labels, probabilities)
        precision, recall, _ = precision_recall_curve(labels, probabilities)
    paths = {"roc_csv": directory / "roc.csv", "pr_csv": directory / "pr.csv",
             "roc_png": directory / "roc.png", "pr_png": directory / "pr.png"}
    pd.DataFrame({"fpr": fpr, "tpr": tpr}).to_csv(paths["roc_csv"], index=False)
    pd.DataFrame({"recall": recall, "precision": precision}).to_csv(paths["pr_csv"], index=False)
    _plot_curves(test, threshold, "roc", paths["roc_png"])
    _plot_curves(test, threshold, "pr", paths["pr_png"])
    return {name: str(path) for name, path in paths.items()}


def _plot_curves(test: pd.DataFrame, threshold: float, kind: str, path: Path) -> None:
    # Figure without pyplot renders with the Agg canvas and keeps no global state.
    figure = Figure(figsize=(5.5, 5.0), dpi=100)
    axes = figure.subplots()
    groups = [("all", test)] + [(f"sex {sex}", test[test["sex"] == sex]) for sex in SEXES]
    for name, frame in groups:
        labels, probabilities = frame["label"].to_numpy(), frame["probability"].to_numpy()
        if len(np.unique(labels)) < 2:
            continue
        flagged = probabilities >= threshold
        if kind == "roc":
            x, y, _ = roc_curve(labels, probabilities)
            point = (1 - recall_score(labels, flagged, pos_label=0), recall_score(labels, flagged))
        else:
            y, x, _ = precision_recall_curve(labels, probabilities)
            point = (recall_score(labels, flagged),
                     precision_score(labels, flagged, zero_division=np.nan))
        line = axes.plot(x, y, label=f"{name} (n={len(frame)})", linewidth=1.5,
                         drawstyle="default" if kind == "roc" else "steps-post")[0]
        axes.plot(*point, marker="o", color=line.get_color())
    if kind == "roc":
        axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    axes.set_xlabel("false positive rate" if kind == "roc" else "recall")
    axes.set_ylabel("true positive rate (recall)" if kind == "roc" else "precision")
    axes.set_title(f"Test split, {'ROC' if kind == 'roc' else 'precision-recall'}; "
                   f"dot: threshold {threshold:.3f}", fontsize=10)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=8)
    figure.savefig(path)


def _log_outcome(document: dict[str, Any], seconds: float) -> None:
    test = document["test"]
    logger.info("evaluate: threshold %.3f (val recall %s), test AUC %s, recall %s, "
                "recall gap between sexes %s (%.1f s)", document["threshold"],
                document["val"]["recall"], test["auc"], test["recall"],
                document["sex_gap"]["recall"], seconds)
    acceptance = document["acceptance"]
    if acceptance["accepted"]:
        logger.info("evaluate: model ACCEPTED by the accuracy criteria")
    else:
        logger.warning("evaluate: model REJECTED: %s", "; ".join(acceptance["reasons"]))


def _number(value: Any) -> float | None:
    """A JSON-safe float rounded to 6 decimals, or None for NaN and infinities."""
    number = float(value)
    return round(number, 6) if math.isfinite(number) else None


def _as_binary(labels: pd.Series) -> pd.Series:
    """Labels as 1 (osteoporosis) / 0 (normal), whether stored as strings or as numbers."""
    return labels.map({"osteoporosis": 1, "normal": 0, 1: 1, 0: 0})


def _named_numbers(values: dict[str, float]) -> dict[str, float | None]:
    return {name: _number(value) for name, value in values.items()}
