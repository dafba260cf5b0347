"""Retention rules: periods, dates read from keys, what each store loses, and audited deletions.

The planning functions are pure and tested with made-up listings; the deletions are tested
against the session's real S3 server, on keys of their own, with a local audit log.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from osteo.audit import AuditLog, AuditSigner, LocalBackend
from osteo.config import ConfigError, bucket, load_params
from osteo.lineage import PURGED, DatasetVersion
from osteo.seaweed import EmbeddedS3
from osteo.storage import s3_client
from osteo.vault import VaultEntryInfo
from tasks.retention import (
    RETENTION_ROLE,
    RetentionError,
    RetentionPolicy,
    RetentionRun,
    StoreObject,
    date_in_key,
    is_expired,
    list_store,
    object_deletion,
    patient_file_created,
    plan_dated,
    plan_training,
    plan_vault,
    retraining_created,
)

TODAY = date(2030, 6, 15)
PATIENT_FILE = "files/" + "ab" * 16 + "/{month}-" + "cd" * 16 + ".enc"


def obj(key: str, modified: date = TODAY, size: int = 10) -> StoreObject:
    return StoreObject(key, size, datetime(modified.year, modified.month, modified.day,
                                           tzinfo=UTC))


def version(name: str, collected: date, objects: list[str], status: str = "live"
            ) -> DatasetVersion:
    return DatasetVersion(
        version_id=name, data_version=None, outputs={"data/split": name + ".dir"},
        manifest_sha256=None, collected_on=collected, remote="s3://osteo-training/dvc",
        objects=objects, total_bytes=0, status=status,
    )


def entry(key: str, pseudonym: str, created: date) -> VaultEntryInfo:
    return VaultEntryInfo(key, "patient", pseudonym,
                          datetime(created.year, created.month, created.day, tzinfo=UTC),
                          50, "0" * 64)


# ---------------------------------------------------------------- policy and dates


def test_policy_is_read_from_the_repository_params() -> None:
    policy = RetentionPolicy.from_params(load_params(Path(__file__).resolve().parents[2]))

    assert policy == RetentionPolicy(730, 730, 7300, 730)


@pytest.mark.parametrize("section", [None, {"training_days": 730}, {
    "training_days": "two years", "retraining_days": 1, "patient_files_days": 1,
    "vault_days": 1}])
def test_missing_or_malformed_period_names_the_setting(section: object) -> None:
    with pytest.raises(ConfigError, match="retention"):
        RetentionPolicy.from_params({"retention": section} if section else {})


def test_record_expires_the_day_after_its_period_ends() -> None:
    created = date(2024, 3, 31)

    assert not is_expired(created, 730, created + timedelta(days=730))
    assert is_expired(created, 730, created + timedelta(days=731))
    assert not is_expired(created, 0, created)


@pytest.mark.parametrize(("key", "expected"), [
    ("cases/2024-05/case.json", date(2024, 5, 31)),
    ("cases/2024-02-case.json", date(2024, 2, 29)),
    ("cases/2024-05-17-case.json", date(2024, 5, 17)),
    ("2023-11/x.parquet", date(2023, 11, 30)),
    ("cases/2024-13/case.json", None),
    ("cases/2024-02-30/case.json", None),
    ("cases/case-20240517.json", None),
    ("cases/x.json", None),
])
def test_date_in_key_is_the_latest_day_it_denotes(key: str, expected: date | None) -> None:
    assert date_in_key(key) == expected


def test_retraining_object_without_a_date_in_its_key_falls_back_to_last_modified() -> None:
    assert retraining_created(obj("cases/2020-01/a.json", TODAY)) == date(2020, 1, 31)
    assert retraining_created(obj("legacy/a.json", date(2021, 2, 3))) == date(2021, 2, 3)


def test_patient_file_counts_from_the_last_day_of_its_month() -> None:
    stored = obj(PATIENT_FILE.format(month="2010-06"), modified=TODAY)
    files = [stored]

    assert patient_file_created(stored) == date(2010, 6, 30)
    assert plan_dated(files, 7300, date(2030, 6, 25), patient_file_created) == []
    assert plan_dated(files, 7300, date(2030, 6, 26), patient_file_created) == files


# ---------------------------------------------------------------- training store


def test_expired_version_loses_only_the_objects_no_live_version_shares() -> None:
    old = version("old", TODAY - timedelta(days=1000), ["dvc/a", "dvc/shared"])
    new = version("new", TODAY - timedelta(days=10), ["dvc/b", "dvc/shared"])
    listing = [obj("dvc/a"), obj("dvc/b"), obj("dvc/shared")]

    plan = plan_training([old, new], listing, 730, TODAY)

    assert [(v.version_id, [o.key for o in objects]) for v, objects in plan.expiring] == [
        ("old", ["dvc/a"])]
    assert plan.live == [new] and plan.shared == 1 and plan.untracked == []


def test_two_expired_versions_never_delete_an_object_twice() -> None:
    first = version("first", TODAY - timedelta(days=900), ["dvc/a", "dvc/gone"])
    second = version("second", TODAY - timedelta(days=800), ["dvc/a", "dvc/c"])

    plan = plan_training([first, second], [obj("dvc/a"), obj("dvc/c")], 730, TODAY)

    assert [[o.key for o in objects] for _, objects in plan.expiring] == [["dvc/a"], ["dvc/c"]]


def test_untracked_objects_expire_by_last_modified_and_purged_versions_keep_nothing() -> None:
    purged = version("purged", TODAY - timedelta(days=2000), ["dvc/left"], status=PURGED)
    old, young = TODAY - timedelta(days=731), TODAY - timedelta(days=730)
    listing = [obj("dvc/left", old), obj("dvc/orphan", young)]

    plan = plan_training([purged], listing, 730, TODAY)

    assert plan.expiring == [] and plan.live == []
    assert [o.key for o in plan.untracked] == ["dvc/left"] and plan.untracked_kept == 1


# ---------------------------------------------------------------- identity vault


def test_vault_entry_goes_when_old_and_used_by_no_live_version() -> None:
    old, young = TODAY - timedelta(days=800), TODAY - timedelta(days=100)
    entries = [entry("patients/used", "P1", old), entry("patients/unused", "P2", old),
               entry("patients/young", "P3", young)]

    expired, kept = plan_vault(entries, frozenset({"P1"}), 730, TODAY)

    assert [e.key for e in expired] == ["patients/unused"] and kept == 1


# ---------------------------------------------------------------- audited deletions


@pytest.fixture()
def local_run(tmp_path: Path) -> RetentionRun:
    log = AuditLog(LocalBackend(tmp_path / "audit"), AuditSigner.generate())
    return RetentionRun(tmp_path, TODAY, False, "run-1", log)


def test_deletion_is_audited_before_it_happens(s3_env: EmbeddedS3, local_run: RetentionRun
                                               ) -> None:
    key = f"retention-test/{uuid.uuid4().hex}/case.json"
    s3_client("radiologist").put_object(Bucket=bucket("retraining"), Key=key, Body=b"{}")
    client = s3_client(RETENTION_ROLE)
    seen: list[int] = []

    def delete() -> None:
        seen.append(len(list(local_run.audit.records())))
        client.delete_object(Bucket=bucket("retraining"), Key=key)

    local_run.delete(RETENTION_ROLE, "retraining", {f"{bucket('retraining')}/{key}": None},
                     "retention_period", delete, {"object_bytes": 2})

    records = list(local_run.audit.records())
    assert seen == [1] and [r.action for r in records] == ["retention.delete"]
    assert records[0].details == {"store": "retraining", "reason": "retention_period",
                                  "object_bytes": 2}
    assert list_store(client, bucket("retraining"), key) == []


def test_refused_deletion_is_audited_as_failed_and_stops_the_run(
    s3_env: EmbeddedS3, local_run: RetentionRun
) -> None:
    # svc_retention has no right on the identity vault: the store itself refuses.
    client, vault_bucket = s3_client(RETENTION_ROLE), bucket("identity_vault")
    key = f"patients/{uuid.uuid4().hex}"

    with pytest.raises(RetentionError, match="identity_vault: cannot delete"):
        local_run.delete(RETENTION_ROLE, "identity_vault", {f"{vault_bucket}/{key}": None},
                         "retention_period", object_deletion(client, vault_bucket, key))

    assert [r.action for r in local_run.audit.records()] == [
        "retention.delete", "retention.delete_failed"]


def test_listing_refused_to_the_role_is_a_retention_error(s3_env: EmbeddedS3) -> None:
    with pytest.raises(RetentionError, match="cannot list s3://"):
        list_store(s3_client(RETENTION_ROLE), bucket("identity_vault"))
