"""The model card states its use, data, results per sex, decision and limits, and no identifier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from osteo.layout import Layout
from osteo.model_card import Lineage, ModelCardError, render_model_card, write_model_card
from tasks.evaluate import evaluate
from tests.tasks.test_evaluate import (
    evaluation_params,
    make_predictions,
    write_ground_truth,
    write_predictions,
)

LINEAGE = Lineage(
    version="20250301T101500Z-3fa2c1d0", created_at="2025-03-01T10:15:00Z",
    data_version="5d41402abc4b2a76b9719d911017c592.dir", code_version="unknown",
    params_sha256="a" * 64, checkpoint_sha256="3fa2c1d0" + "b" * 56,
    export_manifest_sha256="c" * 64,
)


def evaluated(
    project_dir: Path, synthetic: bool = True, **criteria: float
) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Any]]:
    """Predictions, evaluation metrics and params of a project evaluated from scratch."""
    predictions = make_predictions(seed=21)
    write_predictions(project_dir, predictions)
    if synthetic:
        write_ground_truth(project_dir, predictions)
    params = evaluation_params(project_dir, **criteria)
    result = evaluate.fn(Layout(project_dir), params)
    return predictions, result.metrics, params


def test_card_states_intended_use_population_and_simulated_data(project_dir: Path) -> None:
    _, metrics, params = evaluated(project_dir)

    card = render_model_card(metrics, params, LINEAGE)

    assert "**assists** the radiologist" in card
    assert "**does not diagnose**" in card
    assert "adults over 50" in card
    assert "children" in card
    assert "SIMULATED" in card and "nothing about real clinical performance" in card
    assert "MobileNetV2 pretrained on ImageNet" in card and "age, sex and BMI" in card


def test_card_reports_metrics_per_sex_threshold_and_lineage(project_dir: Path) -> None:
    _, metrics, params = evaluated(project_dir)

    card = render_model_card(metrics, params, LINEAGE)

    assert f"at least **{metrics['threshold']:.3f}**" in card
    assert f"| ROC AUC | {metrics['test']['auc']:.3f} |" in card
    auc_ci = metrics["ci95"]["auc"]
    assert f"{auc_ci['low']:.3f} to {auc_ci['high']:.3f}" in card
    women = metrics["by_sex"]["F"]
    assert f"| Women (F) | {women['n_images']} | {women['n_positive']} |" in card
    assert f"| Gap (max - min) | | | {metrics['sex_gap']['recall']:.3f} |" in card
    for value in (LINEAGE.data_version, LINEAGE.params_sha256, LINEAGE.checkpoint_sha256,
                  LINEAGE.version, LINEAGE.export_manifest_sha256):
        assert f"`{value}`" in card
    assert "## Reference: the simulated T-score" in card


def test_card_of_a_rejected_version_gives_the_reasons(project_dir: Path) -> None:
    _, metrics, params = evaluated(project_dir, min_auc=0.999)

    card = render_model_card(metrics, params, LINEAGE)

    assert "**REJECTED**" in card
    assert metrics["acceptance"]["reasons"]
    for reason in metrics["acceptance"]["reasons"]:
        assert f"- {reason}" in card
    assert "**not met**" in card


def test_card_contains_no_identifier_of_the_inputs(project_dir: Path, tmp_path: Path) -> None:
    predictions, metrics, params = evaluated(project_dir)

    card = write_model_card(tmp_path / "model_card.md", metrics, params, LINEAGE)

    written = (tmp_path / "model_card.md").read_text()
    assert written == card
    for identifier in set(predictions["image_id"]) | set(predictions["patient_id"]):
        assert identifier not in written


def test_card_with_an_identifier_is_refused(project_dir: Path, tmp_path: Path) -> None:
    predictions, metrics, params = evaluated(project_dir)
    metrics["notes"].append(f"image {predictions['image_id'].iloc[0]} looked odd")

    with pytest.raises(ModelCardError, match="identifier"):
        write_model_card(tmp_path / "model_card.md", metrics, params, LINEAGE)

    assert not (tmp_path / "model_card.md").exists()


def test_contact_comes_from_params_or_stays_a_placeholder(project_dir: Path) -> None:
    _, metrics, params = evaluated(project_dir, synthetic=False)

    without = render_model_card(metrics, params, LINEAGE)
    params["model_card"] = {"data_controller": "Cabinet de radiologie du Parc",
                            "contact": "dpo@radiologie-parc.example"}
    with_contact = render_model_card(metrics, params, LINEAGE)

    assert "Data controller: [to be completed by the practice]" in without
    assert "Data controller: Cabinet de radiologie du Parc" in with_contact
    assert "dpo@radiologie-parc.example" in with_contact
    assert "SIMULATED" not in without and "one retrospective export" in without
