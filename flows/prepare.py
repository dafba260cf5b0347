"""The data preparation flow: from a hospital export to a versioned, training-ready dataset.

Stages, each a Prefect task from ``tasks/`` and a stage of ``dvc.yaml``:

1. ingest        read the export, hash every file, keep accredited readers' labels (4.28)
2. pseudonymise  replace identities by pseudonyms kept in the identity vault (4.15)
3. validate      Great Expectations suites and outlier rejection, with quarantine (4.9)
4. preprocess    rescale, window, invert MONOCHROME1, bilinear resize, shard
5. split         stratified, patient-grouped 80/10/10 split

Then DVC records the run in ``dvc.lock`` and pushes the pseudonymised outputs to the training
store, so a reviewer can trace the dataset version back to the export it came from.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from osteo import dvc, lineage, trail
from osteo.config import load_params
from osteo.layout import Layout
from osteo.minimise import check_file
from osteo.runlock import project_run
from osteo.summary import AccountingError, StageSummary
from tasks.ingest import ingest
from tasks.preprocess import preprocess
from tasks.pseudonymise import pseudonymise
from tasks.split import split
from tasks.validate import validate

logger = logging.getLogger(__name__)

# The stages in pipeline order; `osteo stage NAME` and dvc.yaml run the same tasks.
DATA_STAGES = {task_.name: task_ for task_ in (ingest, pseudonymise, validate, preprocess, split)}


@dataclass
class PreparationSummary:
    """What one run of the data preparation did, for people and for the flow's callers.

    Attributes:
        stages: the summary of every stage, in order.
        records_in: records in the export (images, orphan annotations, orphan patients).
        accepted: images in the final split dataset.
        quarantined: records rejected over all stages, by ``stage:reason``.
        data_version: DVC hash of the split dataset.
        remote: where DVC pushed the dataset, or empty when not pushed.
        seconds: wall time of the stages.
    """

    stages: list[StageSummary]
    records_in: int
    accepted: int
    quarantined: dict[str, int] = field(default_factory=dict)
    data_version: str | None = None
    remote: str = ""
    seconds: float = 0.0

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())


def account(stages: list[StageSummary]) -> tuple[int, int, dict[str, int]]:
    """Check that every stage received what the previous one accepted and total the counts.

    Returns:
        Records in, records accepted at the end, and quarantined records by ``stage:reason``.

    Raises:
        AccountingError: when a stage lost or invented records.
    """
    quarantined: Counter[str] = Counter()
    for previous, current in zip(stages, stages[1:], strict=False):
        if current.records_in != previous.accepted:
            raise AccountingError(
                f"{current.stage} received {current.records_in} records but {previous.stage} "
                f"accepted {previous.accepted}"
            )
    for summary in stages:  # each stage checked its own in = accepted + quarantined on write
        quarantined.update({f"{summary.stage}:{r}": n for r, n in summary.quarantined.items()})
    return stages[0].records_in, stages[-1].accepted, dict(quarantined)


@task(name="audit-stage")
def audit_stage(project_dir: Path, summary: StageSummary) -> None:
    """Append the stage's audit record; the pseudonymise stage also records the vault access."""
    trail.record_stage("svc_prepare", project_dir, summary)
    if summary.stage == "pseudonymise":
        trail.record("svc_pseudonymise", "vault.access", {}, {
            "patient_count": summary.extra.get("patients", 0),
            "created_count": summary.extra.get("new_patients", 0)
            + summary.extra.get("new_images", 0),
        })


@task(name="dvc-commit-push")
def version_dataset(project_dir: Path, push: bool) -> tuple[str | None, str]:
    """Record the run in dvc.lock and push the pseudonymised outputs to the training store.

    Before anything is recorded, every table bound for the training store is checked against
    the fields that store may hold (control 4.22): an undeclared column stops the run.
    """
    for table in sorted((project_dir / "data").rglob("*")):
        if table.suffix in {".parquet", ".csv"} and "model" not in table.parts:
            check_file("training", table)
    remote = dvc.configure_remote(project_dir, role="svc_prepare") if push else ""
    dvc.commit(project_dir, *DATA_STAGES)
    if push:
        report = dvc.push(project_dir, *DATA_STAGES).splitlines()
        logger.info("dvc push: %s", report[-1] if report else "nothing to push")
        lineage.record_dataset_version(project_dir, stages=tuple(DATA_STAGES))
    return dvc.output_hash(project_dir, "split", "data/split"), remote


@flow(name="prepare-dataset", log_prints=False)
def prepare_dataset(project_dir: str, push: bool = True) -> PreparationSummary:
    """Prepare the export named in ``params.yaml`` into a versioned, split dataset.

    Args:
        project_dir: the DVC project (holds params.yaml and dvc.yaml).
        push: push the outputs to the training store after recording them.

    Returns:
        The run's summary: counts per stage, quarantine by reason, data version, remote.

    Raises:
        ProjectBusyError: when another run is in progress in the project.
    """

    root = Path(project_dir).resolve()
    with project_run(root, "the prepare-dataset flow"):
        return _prepare(root, push)


def _prepare(root: Path, push: bool) -> PreparationSummary:
    """The flow's work, while it holds the project's run lock."""

    # 1. Run the stages in order; each works on the whole dataset in batches or shards.
    layout, params = Layout(root), load_params(root)
    started = time.perf_counter()
    stages = []
    for stage in DATA_STAGES.values():
        stages.append(stage(layout, params))
        audit_stage(root, stages[-1])
    seconds = time.perf_counter() - started

    # 2. Check that no record was lost between stages.
    records_in, accepted, quarantined = account(stages)

    # 3. Version the outputs with DVC and push them to the training store.
    data_version, remote = version_dataset(root, push)

    trail.record("svc_prepare", "dataset.version", trail.output_hashes(root, ["dvc.lock"]),
                 {"accepted": accepted})
    trail.checkpoint("svc_prepare")
    summary = PreparationSummary(stages, records_in, accepted, quarantined, data_version,
                                 remote, seconds)
    _publish_artifact(summary)
    return summary


def _publish_artifact(summary: PreparationSummary) -> None:
    rows: list[dict[str, Any]] = [
        {"stage": s.stage, "in": s.records_in, "accepted": s.accepted,
         "quarantined": s.quarantined_total,
         "reasons": ", ".join(f"{r}={n}" for r, n in sorted(s.quarantined.items()))}
        for s in summary.stages
    ]
    create_table_artifact(rows, key="data-preparation",
                          description=f"Dataset version {summary.data_version}")
