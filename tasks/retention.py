"""Retention stage: delete, in every store, what has outlived its retention period.

Control 4.19, define and implement a data retention policy. ENISA proposes two years for the
data used for training (research data) and twenty years for the patient files kept for legal
disputes. The periods are ``params.yaml`` ``retention`` (in days); each store is handled by one
Prefect task, acting with the least-privileged identity of ``infra/access.yaml`` that can do it:

* training: a dataset version expires with its ``collected_on`` in the lineage register
  (``osteo.lineage``), a DVC object that no live version references with the store's
  LastModified. svc_retention (list, delete) deletes; svc_prepare reads the register and marks
  purged versions (svc_retention may not read or write the training store).
* retraining: each object, dated by a ``YYYY-MM`` or ``YYYY-MM-DD`` path segment or file-name
  prefix of its key, else by the store's LastModified; svc_retention deletes.
* patient_files: each file, dated by the month in its key
  (``osteo.patient_files.created_month``); svc_retention deletes.
* identity_vault: an entry, dated by its ``created_at``, once no live dataset version uses its
  pseudonym; svc_pseudonymise, the only service identity of the vault, reads and deletes.

Rules:

* A record is expired once ``days`` whole days have passed after the latest day it can have
  been created: a record of 2024-03-31 (or of the month 2024-03) with 730 days is deleted from
  2026-04-01. A record is never deleted early: a month counts from its last day, and
  LastModified is never earlier than the creation.
* svc_retention may list and delete but not read the stores, so dates come from the listing:
  writers of the retraining store put the month (or day) in the key, as the patient-file store
  does; an explicit date in object metadata could not be read by this identity.
* Training: the DVC objects of an expired version are deleted unless a live version still
  references them (datasets share unchanged files); the lineage entry stays, with status
  ``purged_for_retention``, its hashes and counts. DVC objects no live version references are
  deleted once their LastModified is past the period (leftovers of versions recorded nowhere).
* Identity vault: an entry goes once it is older than ``vault_days`` and its pseudonym (or
  image id) is in no live dataset version; it follows the training data it links. While the
  training store holds untracked objects still within their period (whose pseudonyms are
  unknown), no vault entry is deleted.
* Every deletion is first an audit record (``retention.delete``: acting role, object keys,
  sha256 where known, store, reason, run id), then the deletion; a refused deletion adds a
  ``retention.delete_failed`` record and stops the run. The run ends with a
  ``retention.run`` record holding the counts per store; a dry run deletes nothing and only
  appends a ``retention.dry_run`` record with the counts it would delete.

Reads    the four stores above, the lineage register, the project's ``.dvc/config``
Writes   deletions, lineage status, audit records; the report is written by the flow
"""

from __future__ import annotations

import calendar
import hashlib
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from prefect import task
from prefect.cache_policies import NO_CACHE

from osteo import lineage, patient_files, vault
from osteo.audit import AuditLog
from osteo.config import ConfigError, bucket
from osteo.lineage import DatasetVersion, RemoteLocation
from osteo.storage import list_objects, s3_client

logger = logging.getLogger(__name__)

RETENTION_ROLE = "svc_retention"
REASON_PERIOD = "retention_period"
REASON_UNTRACKED = "untracked_object"
POLICY_KEYS = ("training_days", "retraining_days", "patient_files_days", "vault_days")
_KEY_DATE = re.compile(r"(?:^|/)(\d{4})-(\d{2})(?:-(\d{2}))?(?=$|[/_.-])")


class RetentionError(Exception):
    """A store refused a retention step; the message names the store and object key only."""


# ---------------------------------------------------------------- policy and dates


@dataclass(frozen=True)
class RetentionPolicy:
    """Retention periods in days (params.yaml ``retention``)."""

    training_days: int
    retraining_days: int
    patient_files_days: int
    vault_days: int

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> RetentionPolicy:
        """Read the periods from params.yaml.

        Raises:
            ConfigError: when ``retention`` or one of its keys is missing or not a
                non-negative whole number of days.
        """
        section = params.get("retention")
        if not isinstance(section, dict):
            raise ConfigError("params.yaml: the 'retention' section is missing "
                              f"(keys {', '.join(POLICY_KEYS)}, in days)")
        values = {}
        for key in POLICY_KEYS:
            value = section.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"params.yaml: retention.{key} must be a whole number of "
                                  f"days >= 0, got {value!r}")
            values[key] = value
        return cls(**values)


def is_expired(created: date, days: int, today: date) -> bool:
    """True once ``days`` whole days have passed after ``created`` (the latest creation day)."""
    return today > created + timedelta(days=days)


def date_in_key(key: str) -> date | None:
    """The latest day a key's ``YYYY-MM`` or ``YYYY-MM-DD`` segment or name prefix denotes.

    Args:
        key: an object key, e.g. ``cases/2024-05/x.parquet`` or ``cases/2024-05-17-x.json``.

    Returns:
        The day (the month's last day for a month), or None when the key holds no valid date.
    """
    match = _KEY_DATE.search(key)
    if match is None:
        return None
    year, month = int(match.group(1)), int(match.group(2))
    if not 1 <= month <= 12:
        return None
    last = calendar.monthrange(year, month)[1]
    try:
        return date(year, month, int(match.group(3)) if match.group(3) else last)
    except ValueError:
        return None


# ---------------------------------------------------------------- listings and reports


@dataclass(frozen=True)
class StoreObject:
    """One listed object: key, size and the store's LastModified (UTC)."""

    key: str
    size: int
    last_modified: datetime

    @property
    def modified_on(self) -> date:
        return self.last_modified.astimezone(UTC).date()


def list_store(client: Any, bucket_name: str, prefix: str = "") -> list[StoreObject]:
    """Every object of a bucket under ``prefix`` (needs the list permission only).

    Raises:
        RetentionError: when the store refuses the listing.
    """
    objects: list[StoreObject] = []
    try:
        objects.extend(StoreObject(item["Key"], int(item["Size"]), item["LastModified"])
                       for item in list_objects(client, bucket_name, prefix))
    except (ClientError, BotoCoreError) as error:
        raise RetentionError(f"cannot list s3://{bucket_name}/{prefix}: {_code(error)}") from None
    return objects


@dataclass
class StoreReport:
    """What the retention run found and removed in one store.

    Attributes:
        store: the store of the access matrix.
        role: the role that deletes there.
        retention_days: the period applied.
        scanned: records examined (objects, or entries for the vault).
        expired: records past their period that nothing still needs (deleted, or to delete).
        deleted: records actually deleted (0 in a dry run).
        bytes: size of the expired records.
        keys: their object keys.
        kept_in_use: records past their period kept because a live version uses them.
        versions: training only, the dataset versions purged (or to purge).
        note: why a step was skipped, when it was.
    """

    store: str
    role: str
    retention_days: int
    scanned: int = 0
    expired: int = 0
    deleted: int = 0
    bytes: int = 0
    keys: list[str] = field(default_factory=list)
    kept_in_use: int = 0
    versions: list[str] = field(default_factory=list)
    note: str = ""

    def add(self, key: str, size: int, deleted: bool) -> None:
        """Count one expired record."""
        self.expired += 1
        self.bytes += size
        self.deleted += int(deleted)
        self.keys.append(key)


@dataclass
class RetentionRun:
    """One run of the retention flow: its clock, mode, identity and audit log.

    Attributes:
        project_dir: the DVC project (params.yaml, .dvc/config, vault key file).
        today: the UTC day the periods are measured against (simulated in tests).
        dry_run: report only, delete nothing.
        run_id: the flow run's id, in every audit record.
        audit: the audit log, opened with a signer by a role that may append.
        actor: the service identity recorded as the actor.
    """

    project_dir: Path
    today: date
    dry_run: bool
    run_id: str
    audit: AuditLog
    actor: str = RETENTION_ROLE

    def delete(
        self, role: str, store: str, objects: dict[str, str | None], reason: str,
        action: Callable[[], None], details: dict[str, Any] | None = None,
    ) -> None:
        """Audit a deletion, then do it; a refused deletion is audited too, then raised.

        Args:
            role: the role doing the deletion.
            store: the store of the access matrix.
            objects: ``bucket/key`` of every object concerned, with its sha256 when known.
            reason: the reason code.
            action: the deletion itself.
            details: further audit details (counts, bytes, hashes).

        Raises:
            RetentionError: when the deletion is refused.
        """
        record = {"store": store, "reason": reason, **(details or {})}
        self.audit.append(self.actor, role, "retention.delete", objects, self.run_id, record)
        try:
            action()
        except (RetentionError, vault.VaultError, lineage.LineageError) as error:
            self.audit.append(self.actor, role, "retention.delete_failed", objects,
                              self.run_id, record)
            raise RetentionError(f"{store}: {error}") from None


def delete_object(client: Any, bucket_name: str, key: str) -> None:
    """Delete one object (a missing object is not an error in S3).

    Raises:
        RetentionError: when the store refuses the deletion.
    """
    try:
        client.delete_object(Bucket=bucket_name, Key=key)
    except (ClientError, BotoCoreError) as error:
        raise RetentionError(f"cannot delete s3://{bucket_name}/{key}: {_code(error)}") from None


def object_deletion(client: Any, bucket_name: str, key: str) -> Callable[[], None]:
    """The deletion of one object, to hand to ``RetentionRun.delete``."""
    return partial(delete_object, client, bucket_name, key)


# ---------------------------------------------------------------- training store


@dataclass
class TrainingPlan:
    """What expires in the training store.

    Attributes:
        expiring: live versions past the period, each with its objects to delete.
        live: versions that stay live.
        shared: objects of expiring versions kept because a live version references them.
        untracked: objects of no live version, past the period by their LastModified.
        untracked_kept: objects of no live version still within the period.
    """

    expiring: list[tuple[DatasetVersion, list[StoreObject]]]
    live: list[DatasetVersion]
    shared: int
    untracked: list[StoreObject]
    untracked_kept: int


def plan_training(
    versions: Iterable[DatasetVersion], listing: Iterable[StoreObject], days: int, today: date
) -> TrainingPlan:
    """Decide what the training store loses (pure: no store access).

    Args:
        versions: every entry of the lineage register.
        listing: the DVC objects present in the remote.
        days: ``retention.training_days``.
        today: the day of the run.

    Returns:
        The plan; an object is deleted at most once, and never while a live version uses it.
    """
    present = {obj.key: obj for obj in listing}
    live = [v for v in versions if v.live]
    expiring = [v for v in live if is_expired(v.collected_on, days, today)]
    staying = [v for v in live if v not in expiring]
    needed = {key for v in staying for key in v.objects}

    # 1. Each expiring version loses the objects no live version needs.
    claimed: set[str] = set()
    plan: list[tuple[DatasetVersion, list[StoreObject]]] = []
    for version in expiring:
        own = [present[k] for k in version.objects
               if k in present and k not in needed and k not in claimed]
        claimed.update(obj.key for obj in own)
        plan.append((version, own))
    shared = len({k for v in expiring for k in v.objects if k in needed and k in present})

    # 2. Objects referenced by no live version expire by their LastModified.
    untracked = [o for k, o in present.items() if k not in needed and k not in claimed]
    old = [o for o in untracked if is_expired(o.modified_on, days, today)]
    return TrainingPlan(plan, staying, shared, old, len(untracked) - len(old))


@dataclass
class TrainingOutcome:
    """The training step's report, and what the vault step needs from it.

    Attributes:
        report: the store report.
        in_use: pseudonyms and image ids of the versions that stay live.
        vault_hold: why vault entries must not be deleted in this run, or empty.
    """

    report: StoreReport
    in_use: frozenset[str]
    vault_hold: str = ""


# Limitation: only the remote is purged. Copies of an expired version in a workspace
# (data/, the local DVC cache, the identifiable work/ of the preparation) and models trained
# on it (models store) stay until removed there (e.g. ``dvc gc`` in each workspace).
@task(name="retention-training", cache_policy=NO_CACHE)
def retain_training(run: RetentionRun, policy: RetentionPolicy) -> TrainingOutcome:
    """Purge expired dataset versions and old untracked objects from the training store.

    Args:
        run: the retention run.
        policy: the retention periods.

    Returns:
        The report and the pseudonyms that live versions still use.

    Raises:
        RetentionError: when the store refuses a listing or deletion.
        LineageError: when the lineage register cannot be read or updated.
    """

    # 1. The register (svc_prepare reads it) and the remote's objects (svc_retention lists).
    location = lineage.remote_location(run.project_dir)
    register = s3_client(lineage.LINEAGE_ROLE)
    deleter = s3_client(RETENTION_ROLE)
    versions = lineage.load_versions(location, register)
    listing = list_store(deleter, location.bucket, location.objects_prefix)
    plan = plan_training(versions, listing, policy.training_days, run.today)
    report = StoreReport("training", RETENTION_ROLE, policy.training_days, scanned=len(listing),
                         kept_in_use=plan.shared)

    # 2. Expired versions: their own objects, then the entry's status.
    for version, objects in plan.expiring:
        _purge_version(run, location, register, deleter, version, objects)
        report.versions.append(version.version_id)
        for obj in objects:
            report.add(obj.key, obj.size, not run.dry_run)

    # 3. Untracked objects past the period.
    for obj in plan.untracked:
        if not run.dry_run:
            run.delete(RETENTION_ROLE, "training", {f"{location.bucket}/{obj.key}": None},
                       REASON_UNTRACKED, object_deletion(deleter, location.bucket, obj.key),
                       {"object_bytes": obj.size})
        report.add(obj.key, obj.size, not run.dry_run)

    # 4. What the vault step must keep.
    in_use = frozenset(i for v in plan.live for i in (*v.patient_ids, *v.image_ids))
    hold = (f"{plan.untracked_kept} training objects within their period belong to no "
            "recorded version; their pseudonyms are unknown") if plan.untracked_kept else ""
    _log(report)
    return TrainingOutcome(report, in_use, hold)


def _purge_version(
    run: RetentionRun, location: RemoteLocation, register: Any, deleter: Any,
    version: DatasetVersion, objects: list[StoreObject],
) -> None:
    if run.dry_run:
        return
    purged = lineage.mark_purged(version, run.today, REASON_PERIOD)
    entry = f"{location.bucket}/{location.version_key(version.version_id)}"
    refs: dict[str, str | None] = {entry: _sha256(purged.to_json())}
    refs |= {f"{location.bucket}/{obj.key}": None for obj in objects}
    details: dict[str, Any] = {"deleted_count": len(objects),
                               "deleted_bytes": sum(o.size for o in objects)}
    if version.manifest_sha256:
        details["manifest_sha256"] = version.manifest_sha256

    purge = partial(_purge, deleter, register, location, [o.key for o in objects], purged)
    run.delete(RETENTION_ROLE, "training", refs, REASON_PERIOD, purge, details)


def _purge(deleter: Any, register: Any, location: RemoteLocation, keys: list[str],
           purged: DatasetVersion) -> None:
    """Delete a version's own objects, then record it as purged (a rerun finishes the job)."""
    for key in keys:
        delete_object(deleter, location.bucket, key)
    lineage.save_version(purged, location, register)


# ---------------------------------------------------------------- stores dated by their keys


def plan_dated(
    objects: Iterable[StoreObject], days: int, today: date,
    created: Callable[[StoreObject], date],
) -> list[StoreObject]:
    """The objects past their period, each dated by ``created`` (pure)."""
    return [obj for obj in objects if is_expired(created(obj), days, today)]


# Limitation: svc_retention cannot read object metadata (HeadObject needs the read permission),
# so a date the writer put in metadata is not used; an undated key falls back to LastModified,
# which a copy or a rewrite moves later (the record is then kept longer, never deleted early).
def retraining_created(obj: StoreObject) -> date:
    """Creation day of a retraining object: the date in its key, else LastModified."""
    return date_in_key(obj.key) or obj.modified_on


def patient_file_created(obj: StoreObject) -> date:
    """Creation day of a patient file: the last day of the month in its key, else LastModified."""
    try:
        year, month = (int(p) for p in patient_files.created_month(obj.key).split("-"))
    except patient_files.PatientFileError:
        return obj.modified_on
    return date(year, month, calendar.monthrange(year, month)[1])


def _retain_dated(
    run: RetentionRun, store: str, days: int, created: Callable[[StoreObject], date]
) -> StoreReport:
    client, bucket_name = s3_client(RETENTION_ROLE), bucket(store)
    listing = list_store(client, bucket_name)
    report = StoreReport(store, RETENTION_ROLE, days, scanned=len(listing))
    for obj in plan_dated(listing, days, run.today, created):
        if not run.dry_run:
            run.delete(RETENTION_ROLE, store, {f"{bucket_name}/{obj.key}": None}, REASON_PERIOD,
                       object_deletion(client, bucket_name, obj.key), {"object_bytes": obj.size})
        report.add(obj.key, obj.size, not run.dry_run)
    _log(report)
    return report


@task(name="retention-retraining", cache_policy=NO_CACHE)
def retain_retraining(run: RetentionRun, policy: RetentionPolicy) -> StoreReport:
    """Delete production cases of the retraining store past ``retraining_days``.

    Raises:
        RetentionError: when the store refuses the listing or a deletion.
    """
    return _retain_dated(run, "retraining", policy.retraining_days, retraining_created)


@task(name="retention-patient-files", cache_policy=NO_CACHE)
def retain_patient_files(run: RetentionRun, policy: RetentionPolicy) -> StoreReport:
    """Delete patient files past ``patient_files_days`` (twenty years by default).

    Raises:
        RetentionError: when the store refuses the listing or a deletion.
    """
    return _retain_dated(run, "patient_files", policy.patient_files_days, patient_file_created)


# ---------------------------------------------------------------- identity vault


def plan_vault(
    entries: Iterable[vault.VaultEntryInfo], in_use: frozenset[str], days: int, today: date
) -> tuple[list[vault.VaultEntryInfo], int]:
    """The vault entries to delete (pure).

    Args:
        entries: every vault entry.
        in_use: pseudonyms and image ids of live dataset versions.
        days: ``retention.vault_days``.
        today: the day of the run.

    Returns:
        The entries to delete, and how many old entries are kept because they are in use.
    """
    old = [e for e in entries if is_expired(e.created_at.astimezone(UTC).date(), days, today)]
    expired = [e for e in old if e.pseudonym not in in_use]
    return expired, len(old) - len(expired)


# Limitation: only dataset versions of the training store keep vault entries alive. Pseudonyms
# of production cases in the retraining store are not checked (svc_retention cannot read it),
# so a patient whose entry went gets a new pseudonym at the next diagnosis.
@task(name="retention-identity-vault", cache_policy=NO_CACHE)
def retain_vault(
    run: RetentionRun, policy: RetentionPolicy, in_use: frozenset[str], hold: str = ""
) -> StoreReport:
    """Delete identity-vault entries past ``vault_days`` that no live dataset version uses.

    The vault is reached as svc_pseudonymise with the vault key file, since only that
    identity (and the administrator) may use it and entries must be decrypted to be dated.

    Args:
        run: the retention run.
        policy: the retention periods.
        in_use: pseudonyms and image ids of the dataset versions that stay live.
        hold: when not empty, why no entry may be deleted in this run.

    Returns:
        The store report.

    Raises:
        RetentionError: when the key file is missing while the vault holds entries, or a
            deletion is refused.
        VaultError: when an entry cannot be read or decrypted.
    """
    report = StoreReport("identity_vault", vault.VAULT_ROLE, policy.vault_days)
    identity_vault = _open_vault(run.project_dir)
    if identity_vault is None:
        report.note = "the identity vault is empty"
        return report
    entries = identity_vault.entry_infos()
    expired, report.kept_in_use = plan_vault(entries, in_use, policy.vault_days, run.today)
    report.scanned = len(entries)
    if hold and expired:
        report.note = f"{len(expired)} expired entries kept: {hold}"
        logger.warning("retention identity_vault: %s", report.note)
        return report
    for entry in expired:
        if not run.dry_run:
            run.delete(vault.VAULT_ROLE, "identity_vault",
                       {f"{identity_vault.bucket}/{entry.key}": entry.sha256}, REASON_PERIOD,
                       partial(identity_vault.delete_entry, entry.key),
                       {"object_bytes": entry.size, "entry_code": entry.kind})
        report.add(entry.key, entry.size, not run.dry_run)
    _log(report)
    return report


def _open_vault(project_dir: Path) -> vault.IdentityVault | None:
    """The vault, or None when it is empty; refuses to create a key file for a full vault."""
    key_file = vault.key_file_path(project_dir)
    if key_file.exists():
        return vault.IdentityVault.open(project_dir, role=vault.VAULT_ROLE)
    client = s3_client(vault.VAULT_ROLE)
    if not list_store(client, bucket("identity_vault"))[:1]:
        return None
    raise RetentionError(f"the identity vault holds entries but its key file {key_file} is "
                         f"missing (set {vault.KEY_FILE_ENV}); entries cannot be dated")


# ---------------------------------------------------------------- the run's report


@dataclass
class RetentionReport:
    """What one retention run removed (or would remove), per store.

    Attributes:
        run_id: the flow run's id, as in the audit records.
        today: the day the periods were measured against.
        dry_run: True when nothing was deleted.
        policy: the periods applied, in days.
        stores: one report per store.
        audit_seq: sequence number of the audit checkpoint that closed the run.
    """

    run_id: str
    today: date
    dry_run: bool
    policy: RetentionPolicy
    stores: list[StoreReport]
    audit_seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The report as written to reports/retention.json."""
        return {"run_id": self.run_id, "today": self.today.isoformat(), "dry_run": self.dry_run,
                "policy": asdict(self.policy), "audit_seq": self.audit_seq,
                "stores": {s.store: asdict(s) for s in self.stores}}

    def store(self, name: str) -> StoreReport:
        """The report of one store."""
        return next(s for s in self.stores if s.store == name)


def close_run(
    run: RetentionRun, policy: RetentionPolicy, stores: list[StoreReport]
) -> RetentionReport:
    """Append the run's summary record and a checkpoint to the audit log.

    Args:
        run: the retention run.
        policy: the periods applied.
        stores: the report of every store.

    Returns:
        The run's report, with the checkpoint's sequence number.
    """
    details: dict[str, Any] = {f"{s.store}_count": s.expired for s in stores}
    details["expired_bytes"] = sum(s.bytes for s in stores)
    action = "retention.dry_run" if run.dry_run else "retention.run"
    run.audit.append(run.actor, RETENTION_ROLE, action, [], run.run_id, details)
    checkpoint = run.audit.checkpoint()
    return RetentionReport(run.run_id, run.today, run.dry_run, policy, stores,
                           checkpoint.seq if checkpoint else 0)


def _log(report: StoreReport) -> None:
    logger.info("retention %s: %d scanned, %d expired (%d bytes), %d deleted, %d kept in use",
                report.store, report.scanned, report.expired, report.bytes, report.deleted,
                report.kept_in_use)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _code(error: Exception) -> str:
    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code", "error"))
    return type(error).__name__
