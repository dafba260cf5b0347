"""Patient files: encrypted on the client, appended by the radiologist, read by the
administrator only, traced in the audit log, and deleted when their retention period ends."""

from __future__ import annotations

import os
import stat
import uuid
from datetime import date
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from osteo.audit import AuditLog, AuditSigner, S3Backend
from osteo.config import ConfigError, bucket
from osteo.minimise import UndeclaredFieldError
from osteo.patient_files import (
    CREATED_METADATA,
    PatientFileError,
    PatientFileStore,
    delete_files,
    expired_files,
    is_expired,
    load_or_create_key,
)
from osteo.seaweed import EmbeddedS3
from osteo.storage import s3_client

JEANNE = {
    "patient_ref": "PF-REF-48213", "first_name": "Jeanne", "last_name": "Van-Hoorebeke",
    "birth_date": "19520317", "consultation_date": "2025-06-12", "radiologist_id": "rad07",
    "image_id": "I0123456789abcdef", "patient_id": "P0123456789abcdef",
    "diagnosis": "osteoporosis", "model_version": "20250601T120000Z-0a1b2c3d",
    "probability": 0.83,
}
IDENTIFYING = ("PF-REF-48213", "Jeanne", "Van-Hoorebeke", "19520317", "1952-03-17",
               "2025-06-12")


def other_patient(ref: str) -> dict[str, object]:
    return JEANNE | {"patient_ref": ref, "first_name": "Marc", "last_name": "Oyelaran"}


@pytest.fixture()
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "patient-files.key"


def store_as(role: str, key_file: Path, audit: AuditLog | None = None) -> PatientFileStore:
    return PatientFileStore.open(role, key_file=key_file, audit=audit)


# ---------------------------------------------------------------- key file


def test_key_file_is_created_owner_only_and_reloaded(key_file: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OSTEO_PATIENT_FILES_KEY_FILE", str(key_file))

    created = load_or_create_key()
    reloaded = load_or_create_key()

    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert created == reloaded and created.data_key != created.index_key


def test_key_file_readable_by_others_is_refused(key_file: Path) -> None:
    load_or_create_key(key_file)
    os.chmod(key_file, 0o644)

    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_key(key_file)


def test_retention_counts_from_the_end_of_the_month() -> None:
    key = "files/" + "ab" * 16 + "/2005-06-" + "cd" * 16 + ".enc"

    assert not is_expired(key, 20, date(2025, 6, 30))
    assert is_expired(key, 20, date(2025, 7, 1))


# ---------------------------------------------------------------- the store


@pytest.mark.s3
def test_administrator_reads_what_the_radiologist_stored(s3_env: EmbeddedS3,
                                                         key_file: Path) -> None:
    key = store_as("radiologist", key_file).put(JEANNE, created=date(2025, 6, 12))

    record = store_as("administrator", key_file).get(key)

    assert record == JEANNE
    assert "/2025-06_" in key


@pytest.mark.s3
def test_stored_bytes_hold_no_identifying_value(s3_env: EmbeddedS3, key_file: Path) -> None:
    radiologist = store_as("radiologist", key_file)
    radiologist.put(JEANNE)
    radiologist.put(other_patient("PF-REF-48214"))
    admin, name = s3_client("administrator"), bucket("patient_files")

    raw = b""
    for page in admin.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            stored = admin.get_object(Bucket=name, Key=item["Key"])
            raw += item["Key"].encode() + repr(stored["Metadata"]).encode()
            raw += stored["Body"].read()

    assert raw, "nothing was stored"
    for value in (*IDENTIFYING, "Oyelaran", "PF-REF-48214"):
        assert value.encode() not in raw and value.lower().encode() not in raw.lower()


@pytest.mark.s3
def test_metadata_holds_only_the_creation_month(s3_env: EmbeddedS3, key_file: Path) -> None:
    key = store_as("radiologist", key_file).put(JEANNE, created=date(2025, 6, 12))

    head = s3_client("administrator").head_object(Bucket=bucket("patient_files"), Key=key)

    assert head["Metadata"] == {CREATED_METADATA: "2025-06"}


@pytest.mark.s3
@pytest.mark.parametrize("role", ["data_scientist", "radiologist", "svc_retention", "auditor"])
def test_only_the_administrator_can_read_a_patient_file(
    s3_env: EmbeddedS3, key_file: Path, role: str
) -> None:
    key = store_as("radiologist", key_file).put(JEANNE)

    with pytest.raises(PatientFileError, match="AccessDenied") as refused:
        store_as(role, key_file).get(key)

    assert not any(value in str(refused.value) for value in IDENTIFYING)


@pytest.mark.s3
def test_data_scientist_cannot_list_or_fetch_the_raw_objects(s3_env: EmbeddedS3,
                                                             key_file: Path) -> None:
    key = store_as("radiologist", key_file).put(JEANNE)
    scientist, name = s3_client("data_scientist"), bucket("patient_files")

    for call in (lambda: scientist.list_objects_v2(Bucket=name),
                 lambda: scientist.get_object(Bucket=name, Key=key)):
        with pytest.raises(ClientError) as refused:
            call()
        assert refused.value.response["Error"]["Code"] == "AccessDenied"


@pytest.mark.s3
def test_body_moved_under_another_key_fails_authentication(s3_env: EmbeddedS3,
                                                           key_file: Path) -> None:
    store = store_as("administrator", key_file)
    key = store_as("radiologist", key_file).put(JEANNE)
    moved = store.patient_prefix("PF-REF-MOVED") + "2025-06-" + "0" * 32 + ".enc"
    admin, name = s3_client("administrator"), bucket("patient_files")
    admin.put_object(Bucket=name, Key=moved,
                     Body=admin.get_object(Bucket=name, Key=key)["Body"].read())

    with pytest.raises(PatientFileError, match="failed authentication"):
        store.get(moved)


@pytest.mark.s3
def test_find_returns_one_patients_files_only(s3_env: EmbeddedS3, key_file: Path) -> None:
    radiologist = store_as("radiologist", key_file)
    ref = f"PF-REF-{uuid.uuid4().hex[:8]}"
    first = radiologist.put(JEANNE | {"patient_ref": ref}, created=date(2024, 1, 5))
    second = radiologist.put(JEANNE | {"patient_ref": ref}, created=date(2025, 3, 9))
    radiologist.put(other_patient(ref + "-other"))

    assert store_as("administrator", key_file).find(ref) == [first, second]


def test_undeclared_field_is_refused_before_anything_is_written(key_file: Path) -> None:
    store = PatientFileStore(load_or_create_key(key_file), client=None, bucket_name="unused")

    with pytest.raises(UndeclaredFieldError, match="home_address"):
        store.put(JEANNE | {"home_address": "12 rue des Lilas"})


@pytest.mark.s3
def test_retention_service_deletes_expired_files_without_reading_them(
    s3_env: EmbeddedS3, key_file: Path
) -> None:
    radiologist = store_as("radiologist", key_file)
    old = radiologist.put(JEANNE, created=date(2001, 2, 3))
    recent = radiologist.put(JEANNE, created=date(2024, 11, 20))
    retention, name = s3_client("svc_retention"), bucket("patient_files")

    expired = expired_files(retention, name, retention_years=20, today=date(2025, 6, 1))
    deleted = delete_files(retention, name, [old])

    assert old in expired and recent not in expired
    assert deleted == 1
    assert old not in store_as("administrator", key_file).find(str(JEANNE["patient_ref"]))
    with pytest.raises(ClientError):
        retention.get_object(Bucket=name, Key=recent)


@pytest.mark.s3
def test_every_read_and_write_is_an_audit_record(s3_env: EmbeddedS3, key_file: Path) -> None:
    signer = AuditSigner.generate()
    prefix = f"patient-files-test/{uuid.uuid4().hex}/"

    def log(role: str) -> AuditLog:
        return AuditLog(S3Backend(s3_client(role), bucket("audit"), prefix), signer)

    key = store_as("radiologist", key_file, audit=log("radiologist")).put(JEANNE)
    store_as("administrator", key_file, audit=log("administrator")).get(key)

    accesses = log("auditor").who_accessed(f"{bucket('patient_files')}/{key}")
    assert [(r.role, r.action) for r in accesses] == [
        ("radiologist", "patient_file.write"), ("administrator", "patient_file.read")]
    assert log("auditor").verify(public_key=signer.public_pem()).ok
