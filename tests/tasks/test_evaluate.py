"""The evaluate stage: threshold on validation, test metrics with intervals, per-sex gaps, criteria.

Predictions are made by hand: probabilities drawn from two normal distributions (one per class)
pushed through a sigmoid, so the expected quality of a "model" is set by their separation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import recall_score, roc_auc_score

from osteo.config import ConfigError, load_params
from osteo.layout import Layout
from tasks.evaluate import (
    GROUND_TRUTH,
    PREDICTIONS,
    TEST_METRICS,
    EvaluationError,
    EvaluationSettings,
    bootstrap_intervals,
    choose_threshold,
    evaluate,
    threshold_metrics,
)

CRITERIA = {"min_auc": 0.75, "min_recall": 0.80, "max_sex_gap": 0.20}


def make_predictions(
    seed: int = 0, patients: tuple[int, int] = (70, 90), separation: float = 3.0,
    male_test_label: int | None = None,
) -> pd.DataFrame:
    """A predictions table of the train stage's contract, for ``patients`` (val, test).

    Args:
        seed: seed of the draws.
        patients: number of patients in the validation and the test split.
        separation: distance between the classes' mean logits (0 is a useless model).
        male_test_label: force every man of the test split to this label.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for split, count in zip(("val", "test"), patients, strict=True):
        for _ in range(count):
            patient, sex = f"P{rng.bytes(8).hex()}", "F" if rng.random() < 0.6 else "M"
            label = int(rng.random() < 0.35)
            if split == "test" and sex == "M" and male_test_label is not None:
                label = male_test_label
            for _ in range(int(rng.integers(1, 3))):
                logit = rng.normal(separation / 2 if label else -separation / 2, 1.0)
                rows.append({"image_id": f"I{rng.bytes(8).hex()}", "patient_id": patient,
                             "split": split, "sex": sex, "label": label,
                             "probability": float(1 / (1 + np.exp(-logit)))})
    return pd.DataFrame(rows)


def write_predictions(project_dir: Path, predictions: pd.DataFrame) -> None:
    path = project_dir / PREDICTIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    predictions.to_parquet(path)


def write_ground_truth(project_dir: Path, predictions: pd.DataFrame, seed: int = 1) -> None:
    """A simulated T-score per image: lower for osteoporosis, with noise."""
    rng = np.random.default_rng(seed)
    t_score = np.where(predictions["label"] == 1, -3.0, -1.0) + rng.normal(0, 0.8,
                                                                          len(predictions))
    truth = pd.DataFrame({"image_id": predictions["image_id"], "t_score": t_score,
                          "true_label": np.where(t_score <= -2.5, "osteoporosis", "normal")})
    path = project_dir / GROUND_TRUTH
    path.parent.mkdir(parents=True, exist_ok=True)
    truth.to_parquet(path)


def evaluation_params(project_dir: Path, **criteria: float) -> dict[str, Any]:
    params = load_params(project_dir)
    params["evaluate"] = {"target_recall": 0.90, "bootstrap": 60, "seed": 11}
    params["criteria"] = CRITERIA | criteria
    return params


def flat_keys(document: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in document.items():
        if isinstance(value, dict):
            keys |= flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def val_arrays(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    val = make_predictions(seed=seed).query("split == 'val'")
    return val["label"].to_numpy(), val["probability"].to_numpy()


# ---------------------------------------------------------------- threshold


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 1.0])
def test_threshold_is_the_highest_that_reaches_the_target_recall_on_val(target: float) -> None:
    labels, probabilities = val_arrays()

    choice = choose_threshold(labels, probabilities, target)

    assert recall_score(labels, probabilities >= choice.threshold) >= target
    higher = probabilities[probabilities > choice.threshold]
    if higher.size:
        assert recall_score(labels, probabilities >= higher.min()) < target
    assert choice.recall == pytest.approx(recall_score(labels, probabilities >= choice.threshold))


@pytest.mark.parametrize("confidence", [0.5, 0.7, 0.9])
def test_threshold_with_a_confidence_is_the_highest_sure_enough_of_the_target(
    confidence: float,
) -> None:
    """The true recall reaches the target with the asked probability (Beta posterior)."""
    labels, probabilities = val_arrays()
    cases = int(labels.sum())

    def sureness(threshold: float) -> float:
        caught = int(((probabilities >= threshold) & (labels == 1)).sum())
        return float(stats.beta.sf(0.90, caught + 1, cases - caught + 1))

    choice = choose_threshold(labels, probabilities, 0.90, confidence)

    assert sureness(choice.threshold) >= confidence
    assert choice.confidence == pytest.approx(sureness(choice.threshold))
    higher = probabilities[probabilities > choice.threshold]
    if higher.size:
        assert sureness(higher.min()) < confidence
    assert choice.threshold <= choose_threshold(labels, probabilities, 0.90).threshold


def test_threshold_flags_every_case_when_the_confidence_cannot_be_reached() -> None:
    """Three cases cannot show a recall of 0.9 with 90 % probability: none is missed."""
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    probabilities = np.array([0.9, 0.7, 0.4, 0.8, 0.3, 0.2, 0.1])

    choice = choose_threshold(labels, probabilities, 0.90, 0.9)

    assert choice.threshold == pytest.approx(0.4)
    assert choice.recall == 1.0 and choice.confidence < 0.9


def test_stage_reports_the_val_threshold_with_its_specificity(project_dir: Path) -> None:
    predictions = make_predictions()
    write_predictions(project_dir, predictions)
    val = predictions.query("split == 'val'")
    expected = choose_threshold(val["label"].to_numpy(), val["probability"].to_numpy(), 0.90)

    result = evaluate.fn(Layout(project_dir), evaluation_params(project_dir))

    assert result.threshold == pytest.approx(expected.threshold)
    assert result.metrics["val"]["recall"] >= 0.90
    flagged = val["probability"] >= result.threshold
    assert result.metrics["val"]["specificity"] == pytest.approx(
        recall_score(val["label"], flagged, pos_label=0), abs=1e-6)


# ---------------------------------------------------------------- test metrics and fairness


def test_test_metrics_are_measured_at_the_val_threshold(project_dir: Path) -> None:
    predictions = make_predictions()
    write_predictions(project_dir, predictions)
    test = predictions.query("split == 'test'")

    result = evaluate.fn(Layout(project_dir), evaluation_params(project_dir))

    flagged = test["probability"] >= result.threshold
    assert result.metrics["test"]["recall"] == pytest.approx(
        recall_score(test["label"], flagged), abs=1e-6)
    assert result.metrics["test"]["auc"] == pytest.approx(
        roc_auc_score(test["label"], test["probability"]), abs=1e-6)
    confusion = result.metrics["confusion"]
    assert sum(confusion.values()) == len(test)
    assert confusion["tp"] + confusion["fn"] == test["label"].sum()


def test_per_sex_metrics_and_their_gap_are_reported(project_dir: Path) -> None:
    predictions = make_predictions(seed=4)
    write_predictions(project_dir, predictions)
    test = predictions.query("split == 'test'")

    result = evaluate.fn(Layout(project_dir), evaluation_params(project_dir))

    by_sex, gap = result.metrics["by_sex"], result.metrics["sex_gap"]
    recalls = {}
    for sex in ("F", "M"):
        group = test[test["sex"] == sex]
        recalls[sex] = recall_score(group["label"], group["probability"] >= result.threshold)
        assert by_sex[sex]["recall"] == pytest.approx(recalls[sex], abs=1e-6)
        assert by_sex[sex]["auc"] == pytest.approx(
            roc_auc_score(group["label"], group["probability"]), abs=1e-6)
        assert set(by_sex[sex]) >= {"precision", "selection_rate", "n_images", "n_positive"}
    assert gap["recall"] == pytest.approx(abs(recalls["F"] - recalls["M"]), abs=1e-6)
    assert gap["auc"] == pytest.approx(abs(by_sex["F"]["auc"] - by_sex["M"]["auc"]), abs=2e-6)


def test_sex_with_a_single_class_gets_null_metrics_a_note_and_a_rejection(
    project_dir: Path,
) -> None:
    write_predictions(project_dir, make_predictions(male_test_label=0))

    result = evaluate.fn(Layout(project_dir), evaluation_params(project_dir))

    men = result.metrics["by_sex"]["M"]
    assert men["recall"] is None and men["auc"] is None
    assert men["selection_rate"] is not None
    assert result.metrics["sex_gap"]["recall"] is None
    assert any("sex M: no osteoporosis case" in note for note in result.metrics["notes"])
    assert not result.accepted
    assert any("recall gap between sexes is undefined" in reason for reason in result.reasons)


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_intervals_contain_the_point_estimates_and_are_seeded() -> None:
    test = make_predictions(seed=5).query("split == 'test'")
    arrays = (test["label"].to_numpy(), test["probability"].to_numpy(), test["sex"].to_numpy(),
              test["patient_id"].to_numpy())
    threshold = 0.5

    first, defined = bootstrap_intervals(*arrays, threshold, resamples=200, seed=7)
    again, _ = bootstrap_intervals(*arrays, threshold, resamples=200, seed=7)
    other, _ = bootstrap_intervals(*arrays, threshold, resamples=200, seed=8)

    assert first == again
    assert first != other
    points = threshold_metrics(arrays[0], arrays[1], threshold)
    for name in TEST_METRICS:
        low, high = first[name]["low"], first[name]["high"]
        assert low is not None and high is not None, name
        assert low <= points[name] <= high, name
        assert low < high, name
    assert defined["auc"] == 200


def test_bootstrap_resamples_whole_patients() -> None:
    # Two images per patient with opposite predictions: resampling images independently
    # would draw any mixture, resampling patients always keeps each pair together.
    labels = np.array([1, 1, 0, 0] * 10)
    probabilities = np.array([0.9, 0.1, 0.8, 0.2] * 10)
    patients = np.repeat([f"P{i:016x}" for i in range(20)], 2)
    sexes = np.array(["F"] * 40)

    intervals, _ = bootstrap_intervals(labels, probabilities, sexes, patients, 0.5, 100, 1)

    # Every patient contributes one flagged and one missed image: recall is 0.5 in every
    # resample, so the interval collapses to a point.
    assert intervals["recall"] == {"low": 0.5, "high": 0.5}


# ---------------------------------------------------------------- oracle


def test_oracle_auc_is_computed_when_ground_truth_exists(project_dir: Path) -> None:
    predictions = make_predictions()
    write_predictions(project_dir, predictions)
    write_ground_truth(project_dir, predictions)
    truth = pd.read_parquet(project_dir / GROUND_TRUTH)
    test = predictions.query("split == 'test'").merge(truth, on="image_id")

    result = evaluate.fn(Layout(project_dir), evaluation_params(project_dir))

    oracle = result.metrics["oracle"]
    expected = roc_auc_score(test["label"], -test["t_score"])
    assert result.metrics["synthetic"] is True
    assert oracle["auc"] == pytest.approx(expected, abs=1e-6)
    assert oracle["auc_gap"] == pytest.approx(result.metrics["test"]["auc"] - expected, abs=1e-5)
    assert oracle["n_images"] == len(test)


def test_oracle_is_null_without_ground_truth(project_dir: Path) -> None:
    write_predictions(project_dir, make_predictions())

    result = evaluate.fn(Layout(project_dir), evaluation_params(project_dir))

    assert result.metrics["synthetic"] is False
    assert result.metrics["oracle"]["auc"] is None


# ---------------------------------------------------------------- criteria


def test_model_missing_the_criteria_is_rejected_with_reasons(project_dir: Path) -> None:
    write_predictions(project_dir, make_predictions(separation=0.4))

    result = evaluate.fn(Layout(project_dir), evaluation_params(project_dir, min_auc=0.9))

    auc = result.metrics["test"]["auc"]
    assert not result.accepted
    assert f"test AUC is {auc:.3f}, below the minimum 0.900 (criteria.min_auc)" in result.reasons
    recorded = json.loads((project_dir / "reports" / "metrics.json").read_text())
    assert recorded["acceptance"]["accepted"] is False
    assert recorded["acceptance"]["reasons"] == result.reasons


def test_model_meeting_the_criteria_is_accepted(project_dir: Path) -> None:
    write_predictions(project_dir, make_predictions(separation=4.0))

    result = evaluate.fn(Layout(project_dir), evaluation_params(project_dir, max_sex_gap=0.3))

    assert result.accepted, result.reasons
    assert result.reasons == []
    assert all(check["passed"] for check in result.metrics["acceptance"]["checks"])


def test_missing_criteria_is_a_config_error(project_dir: Path) -> None:
    write_predictions(project_dir, make_predictions())
    params = evaluation_params(project_dir)
    del params["criteria"]["min_auc"]

    with pytest.raises(ConfigError, match="criteria.min_auc"):
        evaluate.fn(Layout(project_dir), params)


@pytest.mark.parametrize("confidence", [0.3, 1.0, "sure"])
def test_unusable_threshold_confidence_is_a_config_error(
    project_dir: Path, confidence: object
) -> None:
    params = evaluation_params(project_dir)
    params["evaluate"]["threshold_confidence"] = confidence

    with pytest.raises(ConfigError, match="evaluate.threshold_confidence"):
        EvaluationSettings.from_params(params)


# ---------------------------------------------------------------- bad input


def test_unusable_probability_is_reported_with_its_row(project_dir: Path) -> None:
    predictions = make_predictions()
    predictions.loc[2, "probability"] = 1.5
    write_predictions(project_dir, predictions)

    with pytest.raises(EvaluationError, match=r"predictions.parquet: row 3: probability"):
        evaluate.fn(Layout(project_dir), evaluation_params(project_dir))


def test_validation_without_osteoporosis_case_is_an_error(project_dir: Path) -> None:
    predictions = make_predictions()
    predictions.loc[predictions["split"] == "val", "label"] = 0
    write_predictions(project_dir, predictions)

    with pytest.raises(EvaluationError, match="val split holds only normal cases"):
        evaluate.fn(Layout(project_dir), evaluation_params(project_dir))


# ---------------------------------------------------------------- reports


def test_metrics_json_keys_are_stable(project_dir: Path, tmp_path: Path) -> None:
    write_predictions(project_dir, make_predictions())
    degenerate_dir = tmp_path / "degenerate"
    degenerate_dir.mkdir()
    (degenerate_dir / "params.yaml").write_text((project_dir / "params.yaml").read_text())
    degenerate = make_predictions(male_test_label=1)
    write_predictions(degenerate_dir, degenerate)
    write_ground_truth(degenerate_dir, degenerate)

    normal = evaluate.fn(Layout(project_dir), evaluation_params(project_dir))
    odd = evaluate.fn(Layout(degenerate_dir), evaluation_params(degenerate_dir))

    keys = flat_keys(json.loads((project_dir / "reports" / "metrics.json").read_text()))
    assert keys == flat_keys(odd.metrics) == flat_keys(normal.metrics)
    assert keys >= {
        "threshold", "target_recall", "val.recall", "val.specificity", "test.auc",
        "test.recall", "test.precision", "test.f1", "test.accuracy", "test.specificity",
        "ci95.auc.low", "ci95.auc.high", "ci95.recall_F.low", "ci95.recall_F_minus_M.high",
        "by_sex.F.recall", "by_sex.M.auc", "sex_gap.recall", "sex_gap.auc",
        "confusion.tp", "oracle.auc", "oracle.auc_gap", "acceptance.accepted",
        "acceptance.reasons", "acceptance.criteria.max_sex_gap", "dataset.train.n_images",
    }


def test_curves_are_written_as_png_and_csv(project_dir: Path) -> None:
    predictions = make_predictions()
    write_predictions(project_dir, predictions)

    evaluate.fn(Layout(project_dir), evaluation_params(project_dir))

    plots = project_dir / "reports" / "plots"
    for name in ("roc.png", "pr.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    roc = pd.read_csv(plots / "roc.csv")
    pr = pd.read_csv(plots / "pr.csv")
    assert list(roc.columns) == ["fpr", "tpr"] and list(pr.columns) == ["recall", "precision"]
    assert roc["fpr"].is_monotonic_increasing and roc["tpr"].iloc[-1] == 1.0
    assert len(pr) > 2


def test_reports_hold_no_identifier(project_dir: Path) -> None:
    predictions = make_predictions()
    write_predictions(project_dir, predictions)
    write_ground_truth(project_dir, predictions)

    evaluate.fn(Layout(project_dir), evaluation_params(project_dir))

    written = "".join(path.read_text() for path in (project_dir / "reports").rglob("*")
                      if path.suffix in {".json", ".csv"})
    identifiers = set(predictions["image_id"]) | set(predictions["patient_id"])
    assert not any(identifier in written for identifier in identifiers)


def test_training_split_counts_come_from_the_split_table(project_dir: Path) -> None:
    predictions = make_predictions()
    write_predictions(project_dir, predictions)
    train = pd.DataFrame({"image_id": ["I" + f"{i:016x}" for i in range(8)],
                          "patient_id": ["P" + f"{i // 2:016x}" for i in range(8)],
                          "split": "train"})
    split = pd.concat([train, predictions[["image_id", "patient_id", "split"]]])
    (project_dir / "data" / "split").mkdir(parents=True)
    split.to_parquet(project_dir / "data" / "split" / "split.parquet")
    records = train[["image_id"]].assign(sex=["F", "M"] * 4,
                                         label=["osteoporosis"] + ["normal"] * 7)
    (project_dir / "data" / "prepared").mkdir(parents=True)
    records.to_parquet(project_dir / "data" / "prepared" / "records.parquet")

    result = evaluate.fn(Layout(project_dir), evaluation_params(project_dir))

    assert result.metrics["dataset"]["train"] == {"n_images": 8, "n_patients": 4,
                                                  "prevalence": 0.125, "female_share": 0.5}
    assert result.metrics["dataset"]["test"]["n_images"] == (predictions["split"] == "test").sum()
