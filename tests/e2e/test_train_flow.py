"""The training flow end to end on the small prepared project: one epoch, evaluation, registry.

Uses the dataset the data preparation flow left in the session's project (``--no-prepare``
path: the dataset of dvc.lock is pulled from the training store), trains for one epoch on
64-pixel images, evaluates and registers the model in the real S3 registry.
"""

from __future__ import annotations

import json

import pandas as pd

from flows.train import TrainingSummary
from osteo import dvc, registry
from tests.e2e.conftest import PreparedProject


def test_one_epoch_trains_evaluates_and_registers(
    trained: TrainingSummary, prepared_project: PreparedProject
) -> None:
    root = prepared_project.root
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    predictions = pd.read_parquet(root / "data" / "model" / "predictions.parquet")

    assert set(predictions["split"]) == {"val", "test"}
    assert metrics["test"]["auc"] is not None and set(metrics["by_sex"]) >= {"F", "M"}
    assert metrics["oracle"]["auc"] is not None
    assert trained.version in registry.list_versions()
    assert {"train", "evaluate", "oracle"} <= set(dvc.lock(root)["stages"])


def test_champion_moves_only_to_an_accepted_model(trained: TrainingSummary) -> None:
    manifest = registry.get(trained.version)

    if manifest["status"] == "accepted":
        assert registry.champion() == trained.version
    else:
        assert registry.champion() != trained.version
        assert manifest["reasons"]


def test_model_card_names_no_patient_or_image(
    trained: TrainingSummary, prepared_project: PreparedProject
) -> None:
    from tests.e2e.test_privacy import identifying_values, leaks

    card = (prepared_project.root / "reports" / "model_card.md").read_text()
    ids = pd.read_parquet(prepared_project.root / "data" / "split" / "split.parquet")

    assert "simulated" in card.lower()
    assert not leaks(card.encode(), identifying_values(prepared_project.export))
    assert not any(i in card for i in set(ids["image_id"]) | set(ids["patient_id"]))


def test_registration_and_promotion_are_audited(trained: TrainingSummary) -> None:
    from osteo.audit import open_log

    log = open_log("s3", role="auditor")
    actions = [entry.action for entry in log.query(None, None, None)]

    assert log.verify().ok
    assert {"stage.train", "stage.evaluate", "model.register"} <= set(actions)
