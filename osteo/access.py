"""Render the access matrix (``infra/access.yaml``) into what the S3 servers enforce.

The matrix is the single source of who may do what in which store (controls 4.10, implement an
access right management process, and 4.11, ensure all systems comply with authentication and
access control policies). This module turns it into:

* one IAM policy document per role (``role_policy``), used as it is by MinIO
  (``infra/minio/policies/``) and, as identity policies, by the embedded SeaweedFS server;
* the SeaweedFS ``-s3.config`` document (``seaweed_identities``), with each role's own keys;
* the settings that make a store append-only (control 4.16, the audit trail): versioning, an
  Object Lock default retention and a bucket policy denying every delete
  (``append_only_bucket_policy``, applied by ``make_append_only``);
* the ``mc`` setup script for MinIO and the Markdown table shown in README.md.
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

from botocore.exceptions import ClientError

from osteo.config import ConfigError, Credentials

logger = logging.getLogger(__name__)

PERMISSIONS = ("read", "list", "write", "append", "delete")
APPEND_ONLY_PERMISSIONS = frozenset({"read", "list", "append"})

# S3 IAM actions granted by each permission, on the bucket's objects (``arn:...:bucket/*``).
OBJECT_ACTIONS: dict[str, tuple[str, ...]] = {
    "read": ("s3:GetObject", "s3:GetObjectVersion"),
    "write": ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
              "s3:ListMultipartUploadParts"),
    "append": ("s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"),
    "delete": ("s3:DeleteObject",),
}
# ... and on the bucket itself (``arn:...:bucket``).
BUCKET_ACTIONS: dict[str, tuple[str, ...]] = {
    "list": ("s3:ListBucket", "s3:ListBucketVersions", "s3:GetBucketLocation"),
}

# Denied to everyone on an append-only bucket once it is configured: deleting anything, and
# changing the settings that keep it append-only (the policy itself included).
APPEND_ONLY_DENIED = (
    "s3:DeleteObject", "s3:DeleteObjectVersion", "s3:DeleteBucket",
    "s3:PutBucketVersioning", "s3:PutBucketObjectLockConfiguration",
    "s3:PutLifecycleConfiguration", "s3:PutObjectRetention", "s3:PutObjectLegalHold",
    "s3:BypassGovernanceRetention", "s3:PutBucketPolicy", "s3:DeleteBucketPolicy",
)
# What the bootstrap identity may do on append-only buckets, and nothing else.
BOOTSTRAP_ACTIONS = (
    "s3:GetBucketVersioning", "s3:PutBucketVersioning",
    "s3:GetBucketObjectLockConfiguration", "s3:PutBucketObjectLockConfiguration",
    "s3:GetBucketPolicy", "s3:PutBucketPolicy",
)
BOOTSTRAP_IDENTITY = "osteo-bootstrap"
POLICY_VERSION = "2012-10-17"


class AccessError(Exception):
    """An append-only store could not be configured; the message names the bucket."""


# ---------------------------------------------------------------- the matrix


def check_matrix(matrix: dict[str, Any]) -> None:
    """Refuse a matrix that names unknown stores or permissions, or breaks append-only stores.

    Args:
        matrix: the access matrix as loaded from ``infra/access.yaml``.

    Raises:
        ConfigError: naming the role, store and permission at fault.
    """
    stores = matrix["stores"]
    for role, spec in matrix["roles"].items():
        for store, permissions in spec.get("access", {}).items():
            if store not in stores:
                raise ConfigError(f"infra/access.yaml: role {role} names unknown store {store}")
            unknown = set(permissions) - set(PERMISSIONS)
            if unknown:
                raise ConfigError(f"infra/access.yaml: role {role}, store {store}: unknown "
                                  f"permission(s) {', '.join(sorted(unknown))}")
            refused = set(permissions) - APPEND_ONLY_PERMISSIONS
            if stores[store].get("append_only") and refused:
                raise ConfigError(f"infra/access.yaml: store {store} is append-only; role {role} "
                                  f"may not hold {', '.join(sorted(refused))}")


def append_only_stores(matrix: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The stores declared ``append_only``, with their Object Lock settings."""
    return {name: spec for name, spec in matrix["stores"].items() if spec.get("append_only")}


def generate_credentials(roles: list[str]) -> dict[str, Credentials]:
    """Draw a fresh random key pair for every role.

    Args:
        roles: role names from the access matrix.

    Returns:
        The keys of each role.
    """
    return {
        role: Credentials(access_key="OSTEO" + secrets.token_hex(8).upper(),
                          secret_key=secrets.token_urlsafe(30))
        for role in roles
    }


# ---------------------------------------------------------------- policy documents


def _arn(bucket_name: str, objects: bool = False) -> str:
    return f"arn:aws:s3:::{bucket_name}" + ("/*" if objects else "")


def role_policy(matrix: dict[str, Any], role: str) -> dict[str, Any]:
    """Build the IAM policy document of one role (MinIO, AWS S3 and SeaweedFS).

    Args:
        matrix: the access matrix.
        role: a role of the matrix.

    Returns:
        A policy document granting exactly the role's cells and nothing else.
    """
    statements = []
    for store, permissions in matrix["roles"][role].get("access", {}).items():
        name = matrix["stores"][store]["bucket"]
        object_actions = sorted({a for p in permissions for a in OBJECT_ACTIONS.get(p, ())})
        bucket_actions = [a for p in permissions for a in BUCKET_ACTIONS.get(p, ())]
        if object_actions:
            statements.append({"Effect": "Allow", "Action": object_actions,
                               "Resource": [_arn(name, objects=True)]})
        if bucket_actions:
            statements.append({"Effect": "Allow", "Action": bucket_actions,
                               "Resource": [_arn(name)]})
    return {"Version": POLICY_VERSION, "Statement": statements}


def minio_policy(matrix: dict[str, Any], role: str) -> dict[str, Any]:
    """The MinIO policy of one role: its ``role_policy``, as committed in infra/minio/policies."""
    return role_policy(matrix, role)


def append_only_bucket_policy(bucket_name: str) -> dict[str, Any]:
    """The bucket policy of an append-only store: deletes and configuration changes denied.

    The deny holds for every principal, bucket owner and bootstrap identity included, so once
    applied the bucket's versioning, Object Lock and this policy can no longer be changed.

    Args:
        bucket_name: the bucket.

    Returns:
        The bucket policy document.
    """
    return {"Version": POLICY_VERSION, "Statement": [{
        "Sid": "OsteoAppendOnly", "Effect": "Deny", "Principal": "*",
        "Action": list(APPEND_ONLY_DENIED),
        "Resource": [_arn(bucket_name), _arn(bucket_name, objects=True)],
    }]}


def bootstrap_policy(matrix: dict[str, Any]) -> dict[str, Any]:
    """The policy of the bootstrap identity: configure the append-only buckets, nothing else."""
    buckets = [spec["bucket"] for spec in append_only_stores(matrix).values()]
    return {"Version": POLICY_VERSION, "Statement": [{
        "Effect": "Allow", "Action": list(BOOTSTRAP_ACTIONS),
        "Resource": [_arn(name) for name in buckets],
    }]}


# ---------------------------------------------------------------- SeaweedFS


def seaweed_identities(
    matrix: dict[str, Any],
    credentials: dict[str, Credentials],
    bootstrap: Credentials | None = None,
) -> dict[str, Any]:
    """Build the SeaweedFS ``-s3.config`` document: one identity and one policy per role.

    Identities carry policies (``policyNames``) rather than SeaweedFS's coarse actions, whose
    ``Write`` would also allow deleting: the server then enforces the same documents as MinIO.

    Args:
        matrix: the access matrix.
        credentials: the keys of each role.
        bootstrap: keys of the bootstrap identity that makes the append-only stores
            append-only at start; None leaves it out.

    Returns:
        The identities document, ready to be written as JSON.

    Raises:
        ConfigError: when the matrix is inconsistent (``check_matrix``).
    """
    check_matrix(matrix)
    policies = {f"osteo-{role}": role_policy(matrix, role) for role in matrix["roles"]}
    identities = [
        _identity(role, credentials[role], f"osteo-{role}") for role in matrix["roles"]
    ]
    if bootstrap is not None:
        policies[BOOTSTRAP_IDENTITY] = bootstrap_policy(matrix)
        identities.append(_identity(BOOTSTRAP_IDENTITY, bootstrap, BOOTSTRAP_IDENTITY))
    return {
        "identities": identities,
        "policies": [{"name": name, "content": json.dumps(document)}
                     for name, document in policies.items()],
    }


def _identity(name: str, keys: Credentials, policy_name: str) -> dict[str, Any]:
    return {
        "name": name,
        "credentials": [{"accessKey": keys.access_key, "secretKey": keys.secret_key}],
        "policyNames": [policy_name],
    }


# ---------------------------------------------------------------- append-only stores


def make_append_only(client: Any, bucket_name: str, settings: dict[str, Any]) -> None:
    """Turn on versioning, Object Lock default retention and the deny policy of a bucket.

    Idempotent: settings already in place are left as they are. The steps run in this order
    because the bucket policy, applied last, forbids changing the other two.

    Args:
        client: a boto3 S3 client allowed the ``BOOTSTRAP_ACTIONS`` on the bucket.
        bucket_name: the bucket.
        settings: the store's ``append_only`` entry (``mode``, ``retention_years``).

    Raises:
        AccessError: when the server refuses a step.
    """
    lock = {"ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {
        "Mode": settings["mode"], "Years": int(settings["retention_years"])}}}
    policy = append_only_bucket_policy(bucket_name)
    try:
        # 1. Versioning: an overwrite adds a version instead of replacing the object.
        status = client.get_bucket_versioning(Bucket=bucket_name).get("Status")
        if status != "Enabled":
            client.put_bucket_versioning(Bucket=bucket_name,
                                         VersioningConfiguration={"Status": "Enabled"})

        # 2. Object Lock default retention: no version can be deleted before it expires.
        current = _current(client.get_object_lock_configuration, bucket_name,
                           "ObjectLockConfiguration", "ObjectLockConfigurationNotFoundError")
        if current is None:
            client.put_object_lock_configuration(Bucket=bucket_name,
                                                 ObjectLockConfiguration=lock)
        elif current != lock:
            logger.warning("%s keeps its existing Object Lock settings %s; they cannot be "
                           "changed once the bucket is append-only", bucket_name, current)

        # 3. Bucket policy: deny deletes, and any change of steps 1-3, to everyone.
        existing = _current(client.get_bucket_policy, bucket_name, "Policy",
                            "NoSuchBucketPolicy")
        if existing is None:
            client.put_bucket_policy(Bucket=bucket_name, Policy=json.dumps(policy))
        elif json.loads(existing) != policy:
            logger.warning("%s keeps its existing bucket policy; it cannot be changed",
                           bucket_name)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        raise AccessError(f"cannot make s3://{bucket_name} append-only: {code}") from error
    logger.info("s3://%s is append-only (%s, %s years)", bucket_name, settings["mode"],
                settings["retention_years"])


def _current(getter: Any, bucket_name: str, field: str, missing: str) -> Any:
    try:
        return getter(Bucket=bucket_name)[field]
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == missing:
            return None
        raise


# ---------------------------------------------------------------- MinIO and README


def minio_setup_script(matrix: dict[str, Any]) -> str:
    """A POSIX shell script for the ``mc`` client creating buckets, policies and users.

    Append-only stores are created with Object Lock (which turns versioning on) and get their
    default retention; no user policy grants a delete there. Each role's keys are read from
    ``OSTEO_<ROLE>_ACCESS_KEY`` / ``OSTEO_<ROLE>_SECRET_KEY``.

    Args:
        matrix: the access matrix.

    Returns:
        The script's text.

    Raises:
        ConfigError: when the matrix is inconsistent (``check_matrix``).
    """
    check_matrix(matrix)
    lines = [
        "#!/bin/sh",
        "# Generated from infra/access.yaml by `osteo access render-minio`; do not edit.",
        "set -eu",
        'mc alias set osteo "${MINIO_URL:-http://minio:9000}" "$MINIO_ROOT_USER" '
        '"$MINIO_ROOT_PASSWORD"',
    ]
    for spec in matrix["stores"].values():
        lock = spec.get("append_only")
        if lock:
            lines += [
                f"mc mb --ignore-existing --with-lock osteo/{spec['bucket']}",
                f"mc retention set --default {lock['mode'].lower()} "
                f"\"{int(lock['retention_years'])}y\" osteo/{spec['bucket']}",
            ]
        else:
            lines.append(f"mc mb --ignore-existing osteo/{spec['bucket']}")
    for role in matrix["roles"]:
        upper = role.upper()
        lines += [
            f"mc admin policy create osteo osteo-{role} /osteo/policies/{role}.json",
            f'mc admin user add osteo "$OSTEO_{upper}_ACCESS_KEY" "$OSTEO_{upper}_SECRET_KEY"',
            f'mc admin policy attach osteo osteo-{role} --user "$OSTEO_{upper}_ACCESS_KEY"',
        ]
    return "\n".join(lines) + "\n"


def markdown_table(matrix: dict[str, Any]) -> str:
    """The access matrix as a Markdown table: one row per role, one column per store."""
    stores = list(matrix["stores"])
    header = "| role | " + " | ".join(stores) + " |"
    rule = "|---|" + "---|" * len(stores)
    rows = [
        f"| {role} | " + " | ".join(
            ", ".join(spec.get("access", {}).get(store, [])) or "—" for store in stores
        ) + " |"
        for role, spec in matrix["roles"].items()
    ]
    return "\n".join([header, rule, *rows])
