"""Every cell of the access matrix, granted and refused, proven against the real S3 server.

For each role, store and operation (read, list, write, delete) the call succeeds exactly when
``infra/access.yaml`` grants it; the audit store keeps every version and refuses every delete.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError

from osteo.config import StorageSettings, load_access_matrix
from osteo.seaweed import EmbeddedS3
from osteo.storage import s3_client

pytestmark = pytest.mark.s3

MATRIX = load_access_matrix()
ROLES = list(MATRIX["roles"])
STORES = list(MATRIX["stores"])
OPERATIONS = ("read", "list", "write", "delete")
CELLS = [(role, store, op) for role in ROLES for store in STORES for op in OPERATIONS]
RUN = uuid.uuid4().hex[:12]
AUDIT = MATRIX["stores"]["audit"]["bucket"]


def expected(role: str, store: str, operation: str) -> bool:
    """What the matrix grants, read independently of how osteo.access renders it."""
    permissions = set(MATRIX["roles"][role].get("access", {}).get(store, []))
    if operation == "write":
        return bool(permissions & {"write", "append"})
    if operation == "delete":
        append_only = bool(MATRIX["stores"][store].get("append_only"))
        return not append_only and bool(permissions & {"write", "delete"})
    return operation in permissions


def name_of(store: str) -> str:
    return str(MATRIX["stores"][store]["bucket"])


def seed_key(role: str, store: str, operation: str) -> str:
    return f"matrix-{RUN}/{role}/{store}/{operation}"


@pytest.fixture(scope="module")
def clients(s3_server: EmbeddedS3) -> dict[str, Any]:
    """One client per role, reused by every cell."""
    settings = StorageSettings(endpoint_url=s3_server.endpoint_url,
                               credentials_file=s3_server.credentials_file)
    return {role: s3_client(role, settings) for role in ROLES}


@pytest.fixture(scope="module")
def seeded(clients: dict[str, Any]) -> None:
    """An object per cell to read or delete, written by the administrator (append on audit)."""
    writer = clients["administrator"]
    for role in ROLES:
        for store in STORES:
            for operation in ("read", "delete"):
                writer.put_object(Bucket=name_of(store), Key=seed_key(role, store, operation),
                                  Body=b"seed")


def exists(clients: dict[str, Any], store: str, key: str) -> bool:
    try:
        clients["administrator"].head_object(Bucket=name_of(store), Key=key)
    except ClientError as error:
        if error.response["Error"]["Code"] in {"404", "NoSuchKey", "NotFound"}:
            return False
        raise
    return True


def operation_call(client: Any, role: str, store: str, operation: str) -> Callable[[], Any]:
    bucket, key = name_of(store), seed_key(role, store, operation)
    calls: dict[str, Callable[[], Any]] = {
        "read": lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read(),
        "list": lambda: client.list_objects_v2(Bucket=bucket, Prefix=f"matrix-{RUN}/"),
        "write": lambda: client.put_object(Bucket=bucket, Key=key, Body=b"written"),
        "delete": lambda: client.delete_object(Bucket=bucket, Key=key),
    }
    return calls[operation]


@pytest.mark.parametrize(("role", "store", "operation"), CELLS,
                         ids=[f"{r}-{s}-{o}" for r, s, o in CELLS])
def test_server_grants_exactly_the_matrix_cell(
    clients: dict[str, Any], seeded: None, role: str, store: str, operation: str
) -> None:
    call = operation_call(clients[role], role, store, operation)

    if expected(role, store, operation):
        result = call()
        if operation == "read":
            assert result == b"seed"
        if operation == "delete":
            assert not exists(clients, store, seed_key(role, store, operation))
        if operation == "write":
            assert exists(clients, store, seed_key(role, store, operation))
    else:
        with pytest.raises(ClientError) as refused:
            call()
        assert refused.value.response["Error"]["Code"] == "AccessDenied"
        if operation == "delete":
            assert exists(clients, store, seed_key(role, store, operation))


def test_every_matrix_cell_is_checked_and_both_outcomes_occur() -> None:
    outcomes = {expected(role, store, op) for role, store, op in CELLS}

    assert len(CELLS) == len(ROLES) * len(STORES) * len(OPERATIONS)
    assert outcomes == {True, False}


# ---------------------------------------------------------------- the rules the matrix must hold


def test_data_scientist_reaches_neither_patient_files_nor_the_vault() -> None:
    access = MATRIX["roles"]["data_scientist"]["access"]

    assert "patient_files" not in access and "identity_vault" not in access


def test_only_the_pseudonymisation_service_and_the_administrator_reach_the_vault() -> None:
    reaching = {role for role, spec in MATRIX["roles"].items()
                if spec.get("access", {}).get("identity_vault")}

    assert reaching == {"svc_pseudonymise", "administrator"}


def test_every_acting_role_appends_to_the_audit_store_and_the_auditor_writes_nothing() -> None:
    audit = {role: set(spec.get("access", {}).get("audit", []))
             for role, spec in MATRIX["roles"].items()}
    auditor_writes = {p for permissions in MATRIX["roles"]["auditor"]["access"].values()
                      for p in permissions} & {"write", "append", "delete"}

    assert all({"read", "list", "append"} <= audit[role] for role in ROLES if role != "auditor")
    assert audit["auditor"] == {"read", "list"}
    assert not auditor_writes
    assert all(not permissions & {"write", "delete"} for permissions in audit.values())


# ---------------------------------------------------------------- the append-only audit store


def test_overwriting_an_audit_record_keeps_the_original_retrievable(
    clients: dict[str, Any],
) -> None:
    key = f"records-{RUN}/000000000001.json"
    clients["svc_prepare"].put_object(Bucket=AUDIT, Key=key, Body=b"original")

    clients["svc_train"].put_object(Bucket=AUDIT, Key=key, Body=b"forged")

    auditor = clients["auditor"]
    versions = auditor.list_object_versions(Bucket=AUDIT, Prefix=key)["Versions"]
    bodies = {auditor.get_object(Bucket=AUDIT, Key=key, VersionId=v["VersionId"])["Body"].read()
              for v in versions}
    assert len(versions) == 2
    assert bodies == {b"original", b"forged"}


@pytest.mark.parametrize("role", [*ROLES, "bootstrap"])
def test_nobody_can_delete_an_audit_record(
    clients: dict[str, Any], s3_server: EmbeddedS3, role: str
) -> None:
    assert s3_server.bootstrap_credentials is not None
    client = (s3_server.client(s3_server.bootstrap_credentials) if role == "bootstrap"
              else clients[role])
    key = f"records-{RUN}/delete-{role}.json"
    clients["administrator"].put_object(Bucket=AUDIT, Key=key, Body=b"record")
    version = clients["auditor"].head_object(Bucket=AUDIT, Key=key)["VersionId"]

    for call in (lambda: client.delete_object(Bucket=AUDIT, Key=key),
                 lambda: client.delete_object(Bucket=AUDIT, Key=key, VersionId=version)):
        with pytest.raises(ClientError) as refused:
            call()
        assert refused.value.response["Error"]["Code"] == "AccessDenied"
    batch = client.delete_objects(Bucket=AUDIT, Delete={"Objects": [{"Key": key}]})

    assert not batch.get("Deleted")
    assert clients["auditor"].get_object(Bucket=AUDIT, Key=key)["Body"].read() == b"record"


@pytest.mark.parametrize("change", [
    "suspend_versioning", "remove_policy", "replace_policy", "shorten_lock", "add_lifecycle",
    "delete_bucket",
])
def test_audit_store_settings_cannot_be_changed_even_by_the_bootstrap_identity(
    s3_server: EmbeddedS3, change: str
) -> None:
    assert s3_server.bootstrap_credentials is not None
    client = s3_server.client(s3_server.bootstrap_credentials)
    changes: dict[str, Callable[[], Any]] = {
        "suspend_versioning": lambda: client.put_bucket_versioning(
            Bucket=AUDIT, VersioningConfiguration={"Status": "Suspended"}),
        "remove_policy": lambda: client.delete_bucket_policy(Bucket=AUDIT),
        "replace_policy": lambda: client.put_bucket_policy(
            Bucket=AUDIT, Policy='{"Version": "2012-10-17", "Statement": []}'),
        "shorten_lock": lambda: client.put_object_lock_configuration(
            Bucket=AUDIT, ObjectLockConfiguration={"ObjectLockEnabled": "Enabled", "Rule": {
                "DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}}}),
        "add_lifecycle": lambda: client.put_bucket_lifecycle_configuration(
            Bucket=AUDIT, LifecycleConfiguration={"Rules": [{
                "ID": "expire", "Status": "Enabled", "Filter": {"Prefix": ""},
                "Expiration": {"Days": 1}}]}),
        "delete_bucket": lambda: client.delete_bucket(Bucket=AUDIT),
    }

    with pytest.raises(ClientError) as refused:
        changes[change]()

    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    lock = client.get_object_lock_configuration(Bucket=AUDIT)["ObjectLockConfiguration"]
    retention = MATRIX["stores"]["audit"]["append_only"]
    assert lock["Rule"]["DefaultRetention"] == {"Mode": retention["mode"],
                                               "Years": retention["retention_years"]}
    assert client.get_bucket_versioning(Bucket=AUDIT)["Status"] == "Enabled"
