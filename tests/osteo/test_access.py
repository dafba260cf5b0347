"""What osteo.access renders from the matrix: MinIO policies, SeaweedFS identities, README."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from osteo.access import (
    append_only_bucket_policy,
    bootstrap_policy,
    check_matrix,
    markdown_table,
    minio_policy,
    minio_setup_script,
    role_policy,
    seaweed_identities,
)
from osteo.config import PACKAGE_ROOT, ConfigError, Credentials, load_access_matrix


def test_committed_minio_policies_match_the_access_matrix() -> None:
    matrix = load_access_matrix()
    policies = PACKAGE_ROOT / "infra" / "minio" / "policies"

    for role in matrix["roles"]:
        committed = json.loads((policies / f"{role}.json").read_text())
        assert committed == minio_policy(matrix, role), (
            f"regenerate: osteo access render-minio ({role})"
        )
    assert {path.stem for path in policies.glob("*.json")} == set(matrix["roles"])
    assert (PACKAGE_ROOT / "infra" / "minio" / "setup.sh").read_text() == minio_setup_script(matrix)


def test_seaweed_identities_carry_exactly_the_role_policies() -> None:
    matrix = load_access_matrix()
    keys = {role: Credentials(role + "-key", role + "-secret") for role in matrix["roles"]}

    document = seaweed_identities(matrix, keys, bootstrap=Credentials("boot-key", "boot-secret"))

    policies = {p["name"]: json.loads(p["content"]) for p in document["policies"]}
    for identity in document["identities"]:
        assert "actions" not in identity  # coarse SeaweedFS actions would allow deletes
        (name,) = identity["policyNames"]
        role = identity["name"]
        expected = bootstrap_policy(matrix) if role == "osteo-bootstrap" else role_policy(
            matrix, role)
        assert policies[name] == expected
    assert {i["name"] for i in document["identities"]} == {*matrix["roles"], "osteo-bootstrap"}


def test_bootstrap_identity_may_only_configure_the_audit_bucket() -> None:
    (statement,) = bootstrap_policy(load_access_matrix())["Statement"]

    assert statement["Resource"] == ["arn:aws:s3:::osteo-audit"]
    assert all(action.startswith(("s3:GetBucket", "s3:PutBucket"))
               for action in statement["Action"])


def test_append_grants_no_delete_and_write_does() -> None:
    matrix = load_access_matrix()

    radiologist = role_policy(matrix, "radiologist")["Statement"]
    administrator = role_policy(matrix, "administrator")["Statement"]

    assert not any("s3:DeleteObject" in s["Action"] for s in radiologist)
    assert any("s3:DeleteObject" in s["Action"] and s["Resource"] == [
        "arn:aws:s3:::osteo-training/*"] for s in administrator)


def test_append_only_bucket_policy_denies_deletes_to_everyone() -> None:
    (statement,) = append_only_bucket_policy("osteo-audit")["Statement"]

    assert statement["Effect"] == "Deny" and statement["Principal"] == "*"
    assert {"s3:DeleteObject", "s3:DeleteObjectVersion", "s3:PutBucketVersioning",
            "s3:PutBucketObjectLockConfiguration", "s3:DeleteBucketPolicy"} <= set(
        statement["Action"])
    assert "s3:PutObject" not in statement["Action"]


def test_minio_setup_creates_the_audit_bucket_locked_with_its_retention() -> None:
    script = minio_setup_script(load_access_matrix())

    assert "mc mb --ignore-existing --with-lock osteo/osteo-audit" in script
    assert 'mc retention set --default compliance "20y" osteo/osteo-audit' in script


@pytest.mark.parametrize(("role", "store", "permissions", "message"), [
    ("data_scientist", "audit", ["read", "write"], "append-only"),
    ("auditor", "audit", ["delete"], "append-only"),
    ("auditor", "training", ["read", "erase"], "unknown permission"),
    ("auditor", "backups", ["read"], "unknown store"),
])
def test_inconsistent_matrix_is_refused_naming_the_cell(
    role: str, store: str, permissions: list[str], message: str
) -> None:
    matrix = copy.deepcopy(load_access_matrix())
    matrix["roles"][role]["access"][store] = permissions

    with pytest.raises(ConfigError, match=message) as refused:
        check_matrix(matrix)

    assert role in str(refused.value) and store in str(refused.value)


def test_readme_shows_the_current_access_matrix() -> None:
    readme = (Path(PACKAGE_ROOT) / "README.md").read_text()

    assert markdown_table(load_access_matrix()) in readme
