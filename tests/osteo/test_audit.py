"""The audit trail detects every kind of tampering, refuses identifying values, answers "who"."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from osteo.audit import (
    AuditError,
    AuditLog,
    AuditPrivacyError,
    AuditRecord,
    AuditSigner,
    LocalBackend,
    S3Backend,
    export_log,
    load_signer,
)
from osteo.cli import app
from osteo.config import ConfigError, bucket
from osteo.seaweed import EmbeddedS3
from osteo.storage import s3_client

DIGEST = hashlib.sha256(b"shard").hexdigest()


def _fill(log: AuditLog, count: int) -> list[AuditRecord]:
    return [
        log.append("svc_prepare", "svc_prepare", "stage.preprocess",
                   {f"data/prepared/pixels/shard-{i:03d}.npz": DIGEST}, run_id=f"run-{i // 10}",
                   details={"records_in": i, "quarantined": 0})
        for i in range(1, count + 1)
    ]


def _entry(root: Path, folder: str, seq: int) -> Path:
    return root / folder / f"{seq:012d}.json"


def _rewrite(path: Path, data: bytes) -> None:
    os.chmod(path, 0o640)  # entries are created read-only; an attacker would chmod too
    path.write_bytes(data)


@pytest.fixture()
def signer() -> AuditSigner:
    return AuditSigner.generate()


@pytest.fixture()
def log(tmp_path: Path, signer: AuditSigner) -> AuditLog:
    return AuditLog(LocalBackend(tmp_path / "audit"), signer, checkpoint_every=5)


# ---------------------------------------------------------------- integrity


def test_untouched_log_verifies(log: AuditLog) -> None:
    records = _fill(log, 12)
    log.checkpoint()

    result = log.verify()

    assert result.ok and result.reason is None
    assert result.count == 12
    assert result.head_seq == 12 and result.head_hash == records[-1].hash
    assert result.checkpoints == 3  # at 5 and 10 automatically, at 12 explicitly


def test_records_chain_to_their_predecessor(log: AuditLog) -> None:
    first, second = _fill(log, 2)

    assert (first.seq, second.seq) == (1, 2)
    assert first.prev == "0" * 64
    assert second.prev == first.hash


def test_edited_record_is_detected_naming_it(log: AuditLog, tmp_path: Path) -> None:
    _fill(log, 8)
    path = _entry(tmp_path / "audit", "records", 4)
    stored = json.loads(path.read_bytes())
    stored["actor"] = "data_scientist"
    _rewrite(path, json.dumps(stored).encode())

    result = log.verify()

    assert not result.ok
    assert result.first_broken_seq == 4 and result.count == 3
    assert "altered" in (result.reason or "")


def test_deleted_record_is_detected_naming_it(log: AuditLog, tmp_path: Path) -> None:
    _fill(log, 8)
    _entry(tmp_path / "audit", "records", 6).unlink()

    result = log.verify()

    assert not result.ok
    assert result.first_broken_seq == 6
    assert "missing" in (result.reason or "")


def test_reordered_pair_is_detected_naming_the_first(log: AuditLog, tmp_path: Path) -> None:
    _fill(log, 8)
    third, fourth = (_entry(tmp_path / "audit", "records", seq) for seq in (3, 4))
    data3, data4 = third.read_bytes(), fourth.read_bytes()
    _rewrite(third, data4)
    _rewrite(fourth, data3)

    result = log.verify()

    assert not result.ok
    assert result.first_broken_seq == 3
    assert "reordered" in (result.reason or "")


def test_tail_cut_after_a_checkpoint_is_detected(log: AuditLog, tmp_path: Path) -> None:
    _fill(log, 12)
    log.checkpoint()  # covers records 1..12
    for seq in (10, 11, 12):
        _entry(tmp_path / "audit", "records", seq).unlink()

    result = log.verify()

    assert not result.ok
    assert result.first_broken_seq == 10
    assert "cut off" in (result.reason or "")


def test_tail_cut_with_its_checkpoints_is_detected_against_the_expected_head(
    log: AuditLog, tmp_path: Path
) -> None:
    records = _fill(log, 12)
    log.checkpoint()
    for seq in (11, 12):
        _entry(tmp_path / "audit", "records", seq).unlink()
        _entry(tmp_path / "audit", "checkpoints", seq).unlink(missing_ok=True)

    alone = log.verify()
    against_head = log.verify(expected_head=records[-1].hash, expected_seq=12)

    assert alone.ok  # indistinguishable from a shorter log without outside knowledge
    assert not against_head.ok
    assert against_head.first_broken_seq == 11
    assert "cut off" in (against_head.reason or "")


def test_record_differing_from_the_expected_head_is_detected(log: AuditLog) -> None:
    _fill(log, 6)

    result = log.verify(expected_head=hashlib.sha256(b"other").hexdigest(), expected_seq=4)

    assert not result.ok and result.first_broken_seq == 4


def test_record_resigned_with_another_key_is_detected(log: AuditLog, tmp_path: Path) -> None:
    _fill(log, 8)
    path = _entry(tmp_path / "audit", "records", 5)
    forged = AuditRecord.from_json(path.read_bytes())
    forged = replace(forged, action="vault.read")
    digest = forged.computed_hash()
    signature = AuditSigner.generate().sign(b"osteo.audit.record.v1:" + digest.encode())
    _rewrite(path, replace(forged, hash=digest, signature=signature).to_json())

    result = log.verify()

    assert not result.ok
    assert result.first_broken_seq == 5
    assert "signature" in (result.reason or "")


def test_whole_log_resigned_under_a_new_key_fails_against_the_pinned_key(
    signer: AuditSigner, tmp_path: Path
) -> None:
    original = AuditLog(LocalBackend(tmp_path / "original"), signer)
    forged = AuditLog(LocalBackend(tmp_path / "forged"), AuditSigner.generate())
    _fill(original, 3)
    _fill(forged, 3)  # an attacker rewrote the whole log and published their own key

    unpinned = forged.verify()
    pinned = forged.verify(public_key=signer.public_pem())

    assert unpinned.ok and not unpinned.key_pinned
    assert not pinned.ok and pinned.key_pinned
    assert pinned.first_broken_seq == 1


def test_appending_with_another_key_than_the_published_one_is_refused(
    log: AuditLog, tmp_path: Path
) -> None:
    _fill(log, 1)
    intruder = AuditLog(LocalBackend(tmp_path / "audit"), AuditSigner.generate())

    with pytest.raises(AuditError, match="signed with another key"):
        _fill(intruder, 1)


def test_two_writers_keep_one_chain(tmp_path: Path, signer: AuditSigner) -> None:
    first = AuditLog(LocalBackend(tmp_path / "audit"), signer)
    second = AuditLog(LocalBackend(tmp_path / "audit"), signer)

    for _ in range(3):  # each writer's cached head is stale at every append
        first.append("svc_prepare", "svc_prepare", "stage.split", ["data/split/split.parquet"])
        second.append("svc_train", "svc_train", "model.train", ["data/split/split.parquet"])

    result = first.verify()
    assert result.ok and result.count == 6
    assert [r.actor for r in first.records()] == ["svc_prepare", "svc_train"] * 3


def test_stored_record_is_never_overwritten_locally(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "audit")

    assert backend.create("records/000000000001.json", b"first")
    assert not backend.create("records/000000000001.json", b"second")
    assert backend.read("records/000000000001.json") == b"first"


# ---------------------------------------------------------------- privacy rule


@pytest.mark.parametrize(("field", "value"), [
    ("details", {"patient_name": "Jeanne Dupont"}),          # undeclared key
    ("details", {"reason": "Jeanne Dupont"}),                # free text in a code
    ("details", {"reason": "DUPONT^JEANNE"}),                # person name in DICOM form
    ("details", {"status": "born-1952-03-17"}),              # a birth date in a code
    ("details", {"stage": "19520317"}),                      # a birth date, compact
    ("details", {"patient_id": "PAT-000123"}),               # a patient reference, not a pseudonym
    ("details", {"image_ids": ["I0123456789abcdef", "Dupont"]}),
    ("details", {"records_in": "12 patients"}),              # a count that is text
    ("details", {"export_key": "exports/Jeanne Dupont.dcm"}),
    ("objects", {"exports/images/Jeanne Dupont.dcm": None}),
    ("objects", {"data/x.parquet": "not-a-digest"}),
    ("actor", "Jeanne Dupont"),
    ("run_id", "run of Jeanne Dupont"),
])
def test_identifying_values_are_refused(log: AuditLog, field: str, value: object) -> None:
    arguments: dict[str, object] = {
        "actor": "svc_pseudonymise", "role": "svc_pseudonymise", "action": "vault.read",
        "objects": {"vault/identities.parquet.enc": DIGEST}, "run_id": "run-1", "details": {},
    }
    arguments[field] = value

    with pytest.raises(AuditPrivacyError) as refused:
        log.append(**arguments)  # type: ignore[arg-type]

    assert "Dupont" not in str(refused.value) and "1952" not in str(refused.value)
    assert "PAT-000123" not in str(refused.value)
    assert list(log.records()) == []


def test_role_outside_the_access_matrix_is_refused(log: AuditLog) -> None:
    with pytest.raises(AuditPrivacyError, match="role"):
        log.append("jdoe", "superuser", "vault.read", ["vault/identities.parquet.enc"])


def test_declared_details_are_accepted(log: AuditLog) -> None:
    details = {
        "records_in": 120, "accepted": 118, "quarantined": 2, "duration_seconds": 3.5,
        "reason": "unknown_reader", "image_id": "I0123456789abcdef",
        "patient_ids": ["P0123456789abcdef", "Pfedcba9876543210"], "manifest_sha256": DIGEST,
        "output_key": "data/pseudonymised/records.parquet", "model_version": "v3",
    }

    record = log.append("svc_pseudonymise", "svc_pseudonymise", "stage.pseudonymise",
                        {"work/ingest/records.parquet": DIGEST}, run_id="f3c1-77", details=details)

    assert record.details == details
    assert log.verify().ok


# ---------------------------------------------------------------- queries


def test_who_accessed_answers_who_and_when(log: AuditLog) -> None:
    vault = "osteo-identity-vault/identities.parquet.enc"
    log.append("svc_pseudonymise", "svc_pseudonymise", "vault.read", {vault: DIGEST}, "run-1")
    log.append("svc_prepare", "svc_prepare", "stage.preprocess", ["data/prepared/records.parquet"])
    log.append("jdoe", "administrator", "vault.read", [vault])

    accesses = log.who_accessed(vault)

    assert [(r.actor, r.role, r.action) for r in accesses] == [
        ("svc_pseudonymise", "svc_pseudonymise", "vault.read"),
        ("jdoe", "administrator", "vault.read"),
    ]
    for record in accesses:
        when = datetime.fromisoformat(record.time)
        assert when.tzinfo is not None and abs(datetime.now(UTC) - when) < timedelta(minutes=1)
    assert log.who_accessed("data/never-touched.parquet") == []


def test_query_filters_by_actor_and_time(log: AuditLog) -> None:
    _fill(log, 3)
    log.append("jdoe", "auditor", "report.read", ["reports/validate.json"])

    assert [r.seq for r in log.query(actor="jdoe")] == [4]
    assert log.query(since=datetime.now(UTC) + timedelta(hours=1)) == []
    assert len(log.query(since=datetime(2000, 1, 1))) == 4


# ---------------------------------------------------------------- signing key


def test_signing_key_file_is_created_owner_only(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "keys" / "audit.key"
    monkeypatch.setenv("OSTEO_AUDIT_KEY_FILE", str(key_file))

    created = load_signer()
    reloaded = load_signer()

    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert created.key_id == reloaded.key_id


def test_signing_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "audit.key"
    load_signer(key_file)
    os.chmod(key_file, 0o644)

    with pytest.raises(ConfigError, match="chmod 600"):
        load_signer(key_file)


# ---------------------------------------------------------------- command line


def test_cli_verify_reports_an_intact_log(log: AuditLog, tmp_path: Path) -> None:
    _fill(log, 3)

    result = CliRunner().invoke(app, ["audit", "verify", "--log", str(tmp_path / "audit")])

    assert result.exit_code == 0, result.output
    assert "intact: 3 records" in result.output


def test_cli_verify_names_the_first_broken_record(log: AuditLog, tmp_path: Path) -> None:
    _fill(log, 4)
    _entry(tmp_path / "audit", "records", 2).unlink()

    result = CliRunner().invoke(app, ["audit", "verify", "--log", str(tmp_path / "audit")])

    assert result.exit_code == 1
    assert "BROKEN at record 2" in result.output


def test_cli_verify_with_expected_head_detects_truncation(log: AuditLog, tmp_path: Path) -> None:
    head = _fill(log, 4)[-1]
    _entry(tmp_path / "audit", "records", 4).unlink()

    result = CliRunner().invoke(app, ["audit", "verify", "--log", str(tmp_path / "audit"),
                                      "--expect-head", head.hash, "--expect-seq", "4"])

    assert result.exit_code == 1
    assert "BROKEN at record 4" in result.output


def test_cli_show_lists_who_accessed_an_object(log: AuditLog, tmp_path: Path) -> None:
    log.append("jdoe", "administrator", "vault.read", ["vault/identities.parquet.enc"])
    log.append("svc_prepare", "svc_prepare", "stage.split", ["data/split/split.parquet"])

    result = CliRunner().invoke(app, ["audit", "show", "--log", str(tmp_path / "audit"),
                                      "--object", "vault/identities.parquet.enc"])

    assert result.exit_code == 0, result.output
    assert "jdoe" in result.output and "svc_prepare" not in result.output
    assert "1 matching records" in result.output


def test_cli_unknown_log_location_is_one_clear_message(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["audit", "verify", "--log", str(tmp_path / "nowhere")])

    assert result.exit_code == 2
    assert "neither 's3' nor an existing directory" in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- real S3 server

# Each test writes its own log under a unique prefix of the append-only audit bucket.


@pytest.fixture()
def s3_log_backend(s3_env: EmbeddedS3) -> S3Backend:
    return S3Backend(s3_client("svc_prepare"), bucket("audit"),
                     prefix=f"audit-test/{uuid.uuid4().hex}/")


@pytest.mark.s3
def test_s3_round_trip_verifies_and_exports(s3_log_backend: S3Backend, signer: AuditSigner,
                                            tmp_path: Path) -> None:
    writer = AuditLog(s3_log_backend, signer, checkpoint_every=3)
    records = _fill(writer, 4)
    writer.checkpoint()

    reader = AuditLog(S3Backend(s3_client("svc_prepare"), s3_log_backend.bucket,
                                s3_log_backend.prefix))
    online = reader.verify(public_key=signer.public_pem())
    copied = export_log(s3_log_backend, tmp_path / "export")
    offline = AuditLog(LocalBackend(tmp_path / "export")).verify(
        expected_head=records[-1].hash, expected_seq=4, public_key=signer.public_pem())

    assert online.ok and online.count == 4 and online.checkpoints == 2
    assert [r.hash for r in reader.records()] == [r.hash for r in records]
    assert copied == 1 + 4 + 2
    assert offline.ok and offline.count == 4


@pytest.mark.s3
def test_s3_record_is_never_overwritten(s3_log_backend: S3Backend) -> None:
    name = "records/000000000001.json"

    first = s3_log_backend.create(name, b"first")
    second = s3_log_backend.create(name, b"second")

    assert first and not second  # the server answers 412 to If-None-Match: *
    assert s3_log_backend.read(name) == b"first"


@pytest.mark.s3
def test_s3_two_writers_keep_one_chain(s3_log_backend: S3Backend, signer: AuditSigner) -> None:
    first = AuditLog(s3_log_backend, signer)
    second = AuditLog(S3Backend(s3_client("svc_prepare"), s3_log_backend.bucket,
                                s3_log_backend.prefix), signer)

    for _ in range(2):
        first.append("svc_prepare", "svc_prepare", "stage.split", ["data/split/split.parquet"])
        second.append("svc_prepare", "svc_prepare", "stage.preprocess", ["data/prepared/x.npz"])

    result = first.verify()
    assert result.ok and result.count == 4


@pytest.mark.s3
def test_s3_role_without_write_access_gets_a_clear_error(s3_env: EmbeddedS3,
                                                         signer: AuditSigner) -> None:
    backend = S3Backend(s3_client("auditor"), bucket("audit"), prefix="audit-test/ro/")

    with pytest.raises(AuditError, match="AccessDenied"):
        AuditLog(backend, signer).append("jdoe", "auditor", "report.read", ["data/x.npz"])
