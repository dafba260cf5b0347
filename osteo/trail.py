"""The flows' audit records (control 4.16, generate logs and perform internal audit).

Every stage run, every access to the identity vault, every model registration and promotion
appends a signed, hash-chained record to the audit store (``osteo.audit``): who (the service
identity and its role), what (a dotted action code), which objects with their sha256, and in
which Prefect flow run. The objects of a stage are the outputs ``dvc.yaml`` declares for it, so
the audit trail and the DVC lineage name the same files. Details hold counts and codes only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from osteo.audit import AuditLog, file_sha256, load_signer, open_audit_log
from osteo.summary import StageSummary

logger = logging.getLogger(__name__)


@cache
def _log(role: str) -> AuditLog:
    return open_audit_log(role, load_signer())


def flow_run_id() -> str | None:
    """The id of the current Prefect flow run, or None outside a flow."""
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return str(run_id) if run_id else None


def stage_outputs(project_dir: Path, stage: str) -> list[str]:
    """The outputs (outs, metrics, plots) ``dvc.yaml`` declares for a stage."""
    with (project_dir / "dvc.yaml").open() as handle:
        definition = yaml.safe_load(handle)["stages"].get(stage, {})
    declared = [*definition.get("outs", []), *definition.get("metrics", []),
                *definition.get("plots", [])]
    return [next(iter(item)) if isinstance(item, dict) else str(item) for item in declared]


def output_hashes(project_dir: Path, outputs: list[str]) -> dict[str, str]:
    """sha256 of every file of the given outputs (a directory contributes all its files)."""
    hashes: dict[str, str] = {}
    for output in outputs:
        path = project_dir / output
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.exists() and file.name != ".gitignore":
                hashes[str(file.relative_to(project_dir))] = file_sha256(file)
    return hashes


def record(
    role: str,
    action: str,
    objects: Mapping[str, str | None] | None = None,
    details: Mapping[str, Any] | None = None,
) -> None:
    """Append one record as the service identity ``role``, in the current flow run."""
    _log(role).append(role, role, action, objects or {}, run_id=flow_run_id(), details=details)


def record_stage(role: str, project_dir: Path, summary: StageSummary) -> None:
    """Append the record of one stage run: its outputs with their hashes and its counts."""
    objects = output_hashes(project_dir, stage_outputs(project_dir, summary.stage))
    record(role, f"stage.{summary.stage}", objects, {
        "stage": summary.stage, "records_in": summary.records_in,
        "accepted": summary.accepted, "quarantined": summary.quarantined_total,
    })


def checkpoint(role: str) -> None:
    """Sign a checkpoint of the log's head, so that cutting off the tail is detectable."""
    _log(role).checkpoint()
