"""The retention flow: apply the data retention policy to every store (control 4.19).

Steps, each a Prefect task of ``tasks/retention.py`` (see there for the rules and roles):

1. training        purge dataset versions older than ``retention.training_days``
2. retraining      delete production cases older than ``retention.retraining_days``
3. patient files   delete patient files older than ``retention.patient_files_days``
4. identity vault  delete entries older than ``retention.vault_days`` that no live version uses

Every deletion is an audit record (control 4.16) and the run ends with a signed audit
checkpoint. The report of what was removed per store (counts, bytes, keys) is returned and
written to ``reports/retention.json``. ``now`` simulates the day of the run; ``dry_run``
reports what would go and deletes nothing.

The run needs the S3 endpoint and the keys of svc_retention, svc_prepare and svc_pseudonymise
(``OSTEO_CREDENTIALS_FILE``), the vault key file (``OSTEO_VAULT_KEY_FILE``) and the audit
signing key every flow uses (``OSTEO_AUDIT_KEY_FILE``, default ``.osteo/audit.key`` in the
working directory).

Scheduling with Prefect 3. Run it nightly from a long-running process (the process serves the
deployment and runs its scheduled flow runs)::

    prefect flow serve flows/retention.py:apply_retention --name nightly \\
        --cron "30 2 * * *" --timezone Europe/Paris

or from Python, ``apply_retention.serve(name="nightly", cron="30 2 * * *",
parameters={"project_dir": "/srv/osteo"})``. With a work pool, declare the deployment in
``prefect.yaml`` and run ``prefect deploy --name nightly-retention``::

    deployments:
      - name: nightly-retention
        entrypoint: flows/retention.py:apply_retention
        parameters: {project_dir: /srv/osteo}
        schedules:
          - cron: "30 2 * * *"
            timezone: Europe/Paris
        work_pool: {name: osteo-process}

Limitation: the flow must not run while a preparation run pushes: an object the new version
shares with an expired one could be deleted between the push and the lineage record. Schedule it
outside preparation hours (or give both deployments one Prefect concurrency limit).
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from osteo.audit import load_signer, open_audit_log
from osteo.config import load_params
from osteo.layout import Layout
from osteo.runlock import project_run
from tasks.retention import (
    RETENTION_ROLE,
    RetentionPolicy,
    RetentionReport,
    RetentionRun,
    close_run,
    retain_patient_files,
    retain_retraining,
    retain_training,
    retain_vault,
)

logger = logging.getLogger(__name__)

REPORT_NAME = "retention.json"


@flow(name="apply-retention", log_prints=False)
def apply_retention(
    project_dir: str,
    now: datetime | None = None,
    dry_run: bool = False,
    audit_prefix: str = "",
) -> RetentionReport:
    """Delete, in every store, what has outlived its retention period.

    Args:
        project_dir: the DVC project (params.yaml ``retention``, .dvc/config).
        now: the moment the periods are measured against (naive means UTC); default now.
        dry_run: report what would be deleted, delete nothing.
        audit_prefix: key prefix of the audit log in the audit store ("" in production).

    Returns:
        The report per store, also written to ``reports/retention.json``.

    Raises:
        ConfigError: when params.yaml ``retention`` or a storage setting is unusable.
        RetentionError: when a store refuses a listing or a deletion.
        ProjectBusyError: when another run is in progress in the project.
    """

    root = Path(project_dir).resolve()
    with project_run(root, "the apply-retention flow"):
        return _retain(root, now, dry_run, audit_prefix)


def _retain(
    root: Path, now: datetime | None, dry_run: bool, audit_prefix: str,
) -> RetentionReport:
    """The flow's work, while it holds the project's run lock."""

    # 1. The policy, the day, and the run's audit log.
    policy = RetentionPolicy.from_params(load_params(root))
    run = _start(root, now, dry_run, audit_prefix)
    logger.info("retention run %s for %s%s", run.run_id, run.today,
                " (dry run: nothing is deleted)" if dry_run else "")

    # 2. Training first: the versions that stay live decide which vault entries stay.
    training = retain_training(run, policy)

    # 3. The stores dated by their keys.
    retraining = retain_retraining(run, policy)
    files = retain_patient_files(run, policy)

    # 4. The identity vault, after the training data it links.
    identities = retain_vault(run, policy, training.in_use, training.vault_hold)

    # 5. Close the audit trail and publish the report.
    report = close_run(run, policy, [training.report, retraining, files, identities])
    _write(report, Layout(root).reports_dir / REPORT_NAME)
    _publish_artifact(report)
    return report


def _start(root: Path, now: datetime | None, dry_run: bool, audit_prefix: str) -> RetentionRun:
    moment = now or datetime.now(UTC)
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    audit = open_audit_log(RETENTION_ROLE, load_signer(), prefix=audit_prefix)
    run_id = str(flow_run.get_id() or uuid.uuid4())
    return RetentionRun(root, moment.astimezone(UTC).date(), dry_run, run_id, audit)


def _write(report: RetentionReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    logger.info("retention report written to %s (audit checkpoint at record %d)", path,
                report.audit_seq)


def _publish_artifact(report: RetentionReport) -> None:
    rows = [{"store": s.store, "role": s.role, "days": s.retention_days, "scanned": s.scanned,
             "expired": s.expired, "deleted": s.deleted, "bytes": s.bytes,
             "kept in use": s.kept_in_use, "note": s.note} for s in report.stores]
    mode = "dry run" if report.dry_run else "deletions"
    create_table_artifact(rows, key="retention",
                          description=f"Retention on {report.today} ({mode})")
