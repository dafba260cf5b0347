"""The retention flow end to end, with a simulated clock, on real Prefect, DVC and SeaweedFS S3.

The flow scans whole stores, so this module runs its own S3 server: on the session's server it
would see (and, with a clock moved two years ahead, delete) what other tests stored there.

The world, with the clock of the run ``TODAY`` (800 days after the real day, so that every
object written now is 800 days old for the flow):

* training: version 1 collected 1000 days ago (expired), version 2 collected 100 days ago
  (live); they share one file. Plus one DVC object recorded by no version.
* retraining: a case dated 800 days ago, one dated 100 days ago, one without a date in its key.
* patient files: one of 7340 days ago (expired at 7300), one of 7000 days ago, one of 10 days ago.
* identity vault: patients A, B, C, D and images a, b, c, d; version 1 holds A, B / a, b and
  version 2 holds B, C / b, c, so A, D, a and d go.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from osteo import dvc, lineage
from osteo.audit import AuditRecord, VerificationResult, load_signer, open_audit_log
from osteo.cli import app
from osteo.config import bucket
from osteo.patient_files import PatientFileStore
from osteo.runtime import prepare_environment
from osteo.seaweed import EmbeddedS3
from osteo.storage import s3_client
from osteo.vault import IdentityVault, PatientIdentity, unpack_segment
from tasks.retention import RetentionReport
from tests.e2e.conftest import new_project

REAL_TODAY = datetime.now(UTC).date()
TODAY = REAL_TODAY + timedelta(days=800)
NOW = datetime(TODAY.year, TODAY.month, TODAY.day, 12, tzinfo=UTC)
STORES = ("training", "retraining", "patient_files", "identity_vault")
# The file both versions hold: DVC names an object by the md5 of its content.
SHARED_MD5 = hashlib.md5(b"shared", usedforsecurity=False).hexdigest()
SHARED_KEY = f"dvc/files/md5/{SHARED_MD5[:2]}/{SHARED_MD5[2:]}"

# Two data stages, as in the real pipeline: outputs pushed, a local-only output, a metric.
PIPELINE = """stages:
  pseudonymise:
    cmd: osteo stage pseudonymise
    outs:
      - data/pseudonymised
      - work/pseudonymise:
          cache: false
          push: false
  split:
    cmd: osteo stage split
    deps:
      - data/pseudonymised
    outs:
      - data/split
    metrics:
      - reports/split.json:
          cache: false
"""


@dataclass
class World:
    """What the module built, and what the stores held before and after each run."""

    root: Path
    versions: list[lineage.DatasetVersion]
    recorded_again: lineage.DatasetVersion
    first_push: set[str]
    second_push: set[str]
    expected: dict[str, set[str]]
    before: dict[str, set[str]]
    after_dry_run: dict[str, set[str]] = field(default_factory=dict)
    after: dict[str, set[str]] = field(default_factory=dict)
    dry_report: RetentionReport | None = None
    report: RetentionReport | None = None
    report_file: dict[str, Any] = field(default_factory=dict)
    lineage_after: list[lineage.DatasetVersion] = field(default_factory=list)
    audit: list[AuditRecord] = field(default_factory=list)
    verification: VerificationResult | None = None


def days_ago(days: int) -> date:
    return TODAY - timedelta(days=days)


def clock(day: date) -> Any:
    return lambda: datetime(day.year, day.month, day.day, 9, tzinfo=UTC)


def contents() -> dict[str, set[str]]:
    """Every key of every store, as the administrator lists them; for the identity vault, the
    keys of the entries its segment objects hold (keyed hashes, readable without the key)."""
    client = s3_client("administrator")
    listing: dict[str, set[str]] = {}
    for store in STORES:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket(store))
        listing[store] = {o["Key"] for page in pages for o in page.get("Contents", [])}
    listing["identity_vault"] = {
        entry
        for key in listing["identity_vault"]
        for entry in unpack_segment(
            client.get_object(Bucket=bucket("identity_vault"), Key=key)["Body"].read())
    }
    return listing


def dvc_objects() -> set[str]:
    return {k for k in contents()["training"] if k.startswith("dvc/")}


def push_version(root: Path, patient_ids: list[str], image_ids: list[str], own: bytes,
                 collected: date) -> lineage.DatasetVersion:
    """Write one small dataset, commit and push it with DVC, record it in the register."""
    for folder in ("data/pseudonymised", "data/split", "work/pseudonymise", "reports"):
        shutil.rmtree(root / folder, ignore_errors=True)
        (root / folder).mkdir(parents=True)
    pd.DataFrame({"patient_id": patient_ids, "image_id": image_ids, "age": [70] * 2}).to_parquet(
        root / "data/pseudonymised/records.parquet")
    (root / "data/split/shared.bin").write_bytes(b"shared")
    (root / "data/split/own.bin").write_bytes(own)
    (root / "work/pseudonymise/image_map.csv").write_text("local only\n")
    (root / "reports/split.json").write_text(json.dumps({"own": own.decode()}))
    dvc.commit(root, "pseudonymise", "split")
    dvc.push(root, "pseudonymise", "split")
    return lineage.record_dataset_version(root, stages=("pseudonymise", "split"),
                                          clock=clock(collected))


def fill_vault(root: Path) -> tuple[dict[str, str], dict[str, str], set[str]]:
    """Patients A-D, each with image a-d, in the identity vault; returns pseudonyms, image ids
    and the entries that must expire (A and D, which no live version uses)."""
    identity_vault = IdentityVault.open(root)
    people = [PatientIdentity(f"REF-{n}", "Ann", f"Test{n}", "19500101") for n in "ABCD"]
    shas = {n: hashlib.sha256(n.encode()).hexdigest() for n in "abcd"}
    patients, images = identity_vault.resolve(
        people, {shas[n.lower()]: f"REF-{n}" for n in "ABCD"})
    pseudonyms = {n: patients.ids[f"REF-{n}"] for n in "ABCD"}
    image_ids = {n: images.ids[shas[n]] for n in "abcd"}
    expected = {identity_vault.patient_key("REF-A"), identity_vault.patient_key("REF-D")}
    return pseudonyms, image_ids, expected


def fill_dated_stores() -> dict[str, set[str]]:
    """Production cases and patient files, written by the radiologist; returns the expired."""
    cases = s3_client("radiologist")
    old, recent = days_ago(800).strftime("%Y-%m"), days_ago(100).strftime("%Y-%m")
    for key in (f"cases/{old}/case-1.json", f"cases/{recent}/case-2.json", "legacy/case-3.json"):
        cases.put_object(Bucket=bucket("retraining"), Key=key, Body=b'{"diagnosis": "normal"}')

    files = PatientFileStore.open("radiologist")
    record = {"patient_ref": "REF-A", "first_name": "Ann", "last_name": "TestA",
              "consultation_date": "2001-01-01", "diagnosis": "normal"}
    expired_file = files.put(record, created=days_ago(7340))
    files.put(record, created=days_ago(7000))
    files.put(record, created=days_ago(10))
    return {"retraining": {f"cases/{old}/case-1.json", "legacy/case-3.json"},
            "patient_files": {expired_file}}


def audit_of(run_id: str, records: list[AuditRecord]) -> list[AuditRecord]:
    return [r for r in records if r.run_id == run_id]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from flows.retention import apply_retention

    base = tmp_path_factory.mktemp("retention")
    with EmbeddedS3(base / "s3") as server, pytest.MonkeyPatch.context() as env:

        # 1. This module's server, keys and Prefect home.
        for name, value in server.environment().items():
            env.setenv(name, value)
        env.setenv("PREFECT_HOME", str(base / "prefect-home"))
        for name, file in (("VAULT", "vault.key"), ("AUDIT", "audit.key"),
                           ("PATIENT_FILES", "patient-files.key")):
            env.setenv(f"OSTEO_{name}_KEY_FILE", str(base / "keys" / file))
        prepare_environment()

        # 2. The vault, then two dataset versions and an object recorded by no version.
        root = new_project(base / "project")
        (root / "dvc.yaml").write_text(PIPELINE)
        dvc.configure_remote(root)
        pseudonyms, image_ids, vault_expired = fill_vault(root)
        first = push_version(root, [pseudonyms["A"], pseudonyms["B"]],
                             [image_ids["a"], image_ids["b"]], b"one", days_ago(1000))
        first_push = dvc_objects()
        second = push_version(root, [pseudonyms["B"], pseudonyms["C"]],
                              [image_ids["b"], image_ids["c"]], b"two", days_ago(100))
        again = lineage.record_dataset_version(root, stages=("pseudonymise", "split"),
                                               clock=clock(days_ago(50)))
        second_push = dvc_objects() - first_push
        untracked = "dvc/files/md5/ff/" + "0" * 30
        s3_client("svc_prepare").put_object(Bucket=bucket("training"), Key=untracked, Body=b"x")

        # 3. The stores dated by their keys.
        expected = fill_dated_stores() | {
            "training": (first_push - {SHARED_KEY}) | {untracked},
            "identity_vault": vault_expired}
        built = World(root, [first, second], again, first_push, second_push, expected,
                      contents())

        # 4. A dry run, then the real run, on the simulated day.
        built.dry_report = apply_retention(str(root), now=NOW, dry_run=True)
        built.after_dry_run = contents()
        built.report = apply_retention(str(root), now=NOW)
        built.after = contents()
        built.report_file = json.loads((root / "reports" / "retention.json").read_text())
        built.lineage_after = lineage.load_versions(lineage.remote_location(root),
                                                    s3_client("svc_prepare"))
        built.audit = list(open_audit_log("auditor").records())
        built.verification = open_audit_log("auditor").verify(
            public_key=load_signer().public_pem())
        yield built


# ---------------------------------------------------------------- lineage register


def test_lineage_entry_lists_the_objects_dvc_pushed(world: World) -> None:
    first, second = world.versions

    assert set(first.objects) == world.first_push
    assert world.second_push <= set(second.objects)
    assert set(second.objects) - world.second_push == {SHARED_KEY}
    assert set(second.outputs) == {"data/pseudonymised", "work/pseudonymise", "data/split",
                                   "reports/split.json"}
    assert second.data_version == second.outputs["data/split"]
    assert second.collected_on == days_ago(100) and second.live


def test_recording_a_version_again_keeps_its_first_collection_day(world: World) -> None:
    assert world.recorded_again == world.versions[1]


def test_purged_version_keeps_its_hashes_but_not_its_pseudonyms(world: World) -> None:
    by_id = {v.version_id: v for v in world.lineage_after}
    first, second = (by_id[v.version_id] for v in world.versions)

    assert first.status == lineage.PURGED and first.purged_on == TODAY
    assert first.purge_reason == "retention_period"
    assert first.outputs == world.versions[0].outputs
    assert first.objects == world.versions[0].objects
    assert first.patient_ids == [] and first.image_ids == [] and first.patients == 2
    assert second == world.versions[1]


# ---------------------------------------------------------------- deletions


def test_dry_run_deletes_nothing_and_reports_what_would_go(world: World) -> None:
    report = world.dry_report
    assert report is not None and report.dry_run
    records = audit_of(report.run_id, world.audit)

    assert world.after_dry_run == world.before
    for store in STORES:
        assert set(report.store(store).keys) == world.expected[store], store
        assert report.store(store).deleted == 0
    assert [r.action for r in records] == ["retention.dry_run"]
    assert records[0].details["training_count"] == len(world.expected["training"])


def test_retention_deletes_exactly_the_expired_records_of_every_store(world: World) -> None:
    report = world.report
    assert report is not None and not report.dry_run

    for store in STORES:
        assert world.before[store] - world.after[store] == world.expected[store], store
        assert world.after[store] <= world.before[store], store
        assert set(report.store(store).keys) == world.expected[store], store
        assert report.store(store).deleted == len(world.expected[store]), store
    assert report.store("training").versions == [world.versions[0].version_id]


def test_objects_and_vault_entries_a_live_version_uses_are_kept(world: World) -> None:
    report = world.report
    assert report is not None

    assert set(world.versions[1].objects) <= world.after["training"]
    assert report.store("training").kept_in_use == 1          # the shared file
    assert len(world.after["identity_vault"]) == 2            # B and C
    assert report.store("identity_vault").kept_in_use == 2


def test_every_deletion_is_audited_and_the_run_ends_with_a_checkpoint(world: World) -> None:
    report = world.report
    assert report is not None
    records = audit_of(report.run_id, world.audit)
    deletions = [r for r in records if r.action == "retention.delete"]
    by_version = [r for r in deletions if "deleted_count" in r.details]
    by_object = [r for r in deletions if "deleted_count" not in r.details]
    deleted = {f"{bucket(s)}/{key}" for s in STORES for key in world.expected[s]}
    entry = lineage.remote_location(world.root).version_key(world.versions[0].version_id)

    # The expired version is one record naming its lineage entry and its objects; every other
    # deleted object (the untracked DVC object included) is a record of its own.
    assert len(by_version) == 1
    assert by_version[0].details["deleted_count"] == len(world.versions[0].objects) - 1
    assert all(len(r.objects) == 1 for r in by_object)
    assert len(by_object) == len(deleted) - by_version[0].details["deleted_count"]
    assert {o.key for r in deletions for o in r.objects} - deleted == {
        f"{bucket('training')}/{entry}"}
    assert {r.role for r in deletions} == {"svc_retention", "svc_pseudonymise"}
    assert [r.action for r in records][-1] == "retention.run"

    assert world.verification is not None and world.verification.ok
    assert world.verification.head_seq == report.audit_seq == records[-1].seq
    assert world.verification.checkpoints >= 2          # one per run


def test_report_is_written_to_reports_retention_json(world: World) -> None:
    report = world.report
    assert report is not None

    assert world.report_file == report.to_dict()
    assert world.report_file["stores"]["patient_files"]["deleted"] == 1


# ---------------------------------------------------------------- command line


def test_cli_dry_run_prints_one_row_per_store_and_deletes_nothing(world: World) -> None:
    later = (TODAY + timedelta(days=7300)).isoformat()

    result = CliRunner().invoke(app, ["retention", "--dry-run", "--now", later,
                                      "--project-dir", str(world.root)])

    assert result.exit_code == 0, result.output
    assert "dry run: nothing deleted" in result.output
    assert all(store in result.output for store in STORES)
    assert contents() == world.after


def test_cli_refuses_a_day_that_is_not_a_date(world: World) -> None:
    result = CliRunner().invoke(app, ["retention", "--now", "2031-02-30",
                                      "--project-dir", str(world.root)])

    assert result.exit_code == 2
    assert "--now 2031-02-30 is not a date" in result.output
    assert "Traceback" not in result.output
