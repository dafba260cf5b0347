"""The training flow: data preparation, training, evaluation, registration and promotion.

1. prepare   the data preparation flow (skipped with ``prepare=False``: the dataset of
             ``dvc.lock`` is pulled from the training store instead)
2. oracle    ground truth of a synthetic export, by pseudonymous image id
3. train     fine-tune MobileNetV2 with the age, sex and BMI fusion head
4. evaluate  threshold for the target recall, metrics with intervals, per-sex gap (4.25, 4.29)
5. version   DVC records the model and its metrics; the model goes to the registry, and only a
             model meeting the accuracy criteria becomes the champion (control 4.25)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.prepare import DATA_STAGES, PreparationSummary, prepare_dataset
from osteo import dvc, registry, trail
from osteo.config import load_params
from osteo.layout import Layout
from osteo.runlock import project_run
from tasks.evaluate import EvaluationResult, evaluate
from tasks.oracle import oracle
from tasks.train import TrainResult, train

logger = logging.getLogger(__name__)

MODEL_STAGES = {task_.name: task_ for task_ in (oracle, train, evaluate)}


@dataclass
class TrainingSummary:
    """What one run of the training flow produced.

    Attributes:
        preparation: the data preparation summary, or None when the dataset was pulled.
        training: the train stage's result.
        evaluation: the evaluation, with the acceptance decision and its reasons.
        version: the model version in the registry.
        champion: the version the champion alias points to after this run.
        data_version: DVC hash of the split dataset the model was trained on.
    """

    preparation: PreparationSummary | None
    training: TrainResult
    evaluation: EvaluationResult
    version: str
    champion: str | None
    data_version: str | None


@task(name="dvc-commit-push-model")
def version_model(project_dir: Path, push: bool) -> str | None:
    """Record the model stages in dvc.lock and push the model to the registry bucket."""
    if push:
        dvc.configure_remote(project_dir, role="svc_prepare")
        dvc.configure_models_remote(project_dir, role="svc_train")
    dvc.commit(project_dir, *MODEL_STAGES)
    if push:
        dvc.push(project_dir, *MODEL_STAGES)
    return dvc.output_hash(project_dir, "split", "data/split")


@task(name="register-model")
def register_model(project_dir: Path, data_version: str | None) -> tuple[str, str | None]:
    """Register the evaluated model; promote it to champion only when it was accepted."""
    layout, params = Layout(project_dir), load_params(project_dir)
    manifest = registry.register(layout, params, data_version or "unknown")
    version = str(manifest["version"])
    # The registry object names the version; dates are kept out of audit details.
    checkpoint = {f"versions/{version}/model.ckpt": manifest.get("checkpoint_sha256")}
    trail.record("svc_train", "model.register", checkpoint, {"status": str(manifest["status"])})
    if manifest["status"] == "accepted":
        registry.promote(version)
        trail.record("svc_train", "model.promote", checkpoint, {"status": "champion"})
        logger.info("model %s accepted and promoted to champion", version)
    else:
        logger.warning("model %s rejected (%s); the champion alias does not move",
                       version, "; ".join(manifest.get("reasons", [])))
    return version, registry.champion()


@flow(name="train-model", log_prints=False)
def train_model(project_dir: str, prepare: bool = True, push: bool = True) -> TrainingSummary:
    """Prepare the data (optionally), train, evaluate, version and register a model.

    Args:
        project_dir: the DVC project (holds params.yaml and dvc.yaml).
        prepare: run the data preparation flow first; otherwise pull the recorded dataset.
        push: push data and model with DVC.

    Returns:
        The run's summary.

    Raises:
        ProjectBusyError: when another run is in progress in the project.
    """
    root = Path(project_dir).resolve()
    with project_run(root, "the train-model flow"):
        return _train(root, prepare, push)


def _train(root: Path, prepare: bool, push: bool) -> TrainingSummary:
    """The flow's work, while it holds the project's run lock."""

    # 1. The dataset: prepared now, or pulled as recorded in dvc.lock.
    preparation = prepare_dataset(str(root), push=push) if prepare else None
    if not prepare:
        dvc.configure_remote(root, role="svc_prepare")
        dvc.pull(root, *DATA_STAGES)

    # 2. Ground truth (synthetic exports), training and evaluation.
    layout, params = Layout(root), load_params(root)
    oracle(layout, params)
    training = train(layout, params)
    trail.record("svc_train", "stage.train", trail.output_hashes(root, ["data/model"]),
                 {"stage": "train"})
    evaluation = evaluate(layout, params)
    trail.record("svc_train", "stage.evaluate",
                 trail.output_hashes(root, ["reports/metrics.json"]),
                 {"stage": "evaluate", "status": "accepted" if evaluation.accepted
                  else "rejected"})

    # 3. Lineage in DVC, then the registry; only an accepted model becomes champion.
    data_version = version_model(root, push)
    version, champion = register_model(root, data_version)

    trail.checkpoint("svc_train")
    _publish_artifacts(root, evaluation, version)
    return TrainingSummary(preparation, training, evaluation, version, champion, data_version)


def _publish_artifacts(root: Path, evaluation: EvaluationResult, version: str) -> None:
    metrics: dict[str, Any] = evaluation.metrics
    rows = [{"metric": key, "value": value} for key, value in sorted(_flat(metrics).items())]
    create_table_artifact(rows, key="model-metrics", description=f"Model {version}")
    card = root / "reports" / "model_card.md"
    if card.exists():
        create_markdown_artifact(card.read_text(), key="model-card",
                                 description=f"Model card of {version}")


def _flat(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flat(value, name + ".")
        elif isinstance(value, int | float | str | bool) or value is None:
            flat[name] = value
    return flat
