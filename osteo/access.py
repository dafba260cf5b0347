"""Render the access matrix (``infra/access.yaml``) into server configurations.

The matrix is the single source of who may do what in which store (controls 4.10, implement
an access right management process, and 4.11, authentication and access for all systems).
This module turns it into the identities file of the embedded SeaweedFS S3 server and gives
each role its own randomly generated keys.
"""

from __future__ import annotations

import secrets
from typing import Any

from osteo.config import Credentials

# SeaweedFS action names for the matrix's permissions; scoped per bucket as ``Action:bucket``.
SEAWEED_ACTIONS = {"read": "Read", "list": "List", "write": "Write"}


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


def seaweed_identities(
    matrix: dict[str, Any], credentials: dict[str, Credentials]
) -> dict[str, Any]:
    """Build the SeaweedFS ``-s3.config`` document granting each role exactly its cells.

    Args:
        matrix: the access matrix as loaded from ``infra/access.yaml``.
        credentials: the keys of each role.

    Returns:
        The identities document, ready to be written as JSON.
    """
    identities = []
    for role, spec in matrix["roles"].items():
        actions = [
            f"{SEAWEED_ACTIONS[permission]}:{matrix['stores'][store]['bucket']}"
            for store, permissions in spec.get("access", {}).items()
            for permission in permissions
        ]
        keys = credentials[role]
        identities.append({
            "name": role,
            "credentials": [{"accessKey": keys.access_key, "secretKey": keys.secret_key}],
            "actions": sorted(actions),
        })
    return {"identities": identities}


# S3 IAM actions granted by each permission of the matrix (MinIO and AWS policy documents).
S3_ACTIONS = {
    "read": ["s3:GetObject"],
    "list": ["s3:ListBucket", "s3:GetBucketLocation"],
    "write": ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
              "s3:ListMultipartUploadParts"],
}


def minio_policy(matrix: dict[str, Any], role: str) -> dict[str, Any]:
    """Build the IAM policy document of one role for MinIO (or AWS S3).

    Args:
        matrix: the access matrix.
        role: a role of the matrix.

    Returns:
        A policy document granting exactly the role's cells and nothing else.
    """
    statements = []
    for store, permissions in matrix["roles"][role].get("access", {}).items():
        name = matrix["stores"][store]["bucket"]
        object_actions = [a for p in permissions if p != "list" for a in S3_ACTIONS[p]]
        if object_actions:
            statements.append({"Effect": "Allow", "Action": sorted(object_actions),
                               "Resource": [f"arn:aws:s3:::{name}/*"]})
        if "list" in permissions:
            statements.append({"Effect": "Allow", "Action": S3_ACTIONS["list"],
                               "Resource": [f"arn:aws:s3:::{name}"]})
    return {"Version": "2012-10-17", "Statement": statements}


def minio_setup_script(matrix: dict[str, Any]) -> str:
    """A POSIX shell script for the ``mc`` client creating buckets, policies and users.

    Each role's keys are read from ``OSTEO_<ROLE>_ACCESS_KEY`` / ``OSTEO_<ROLE>_SECRET_KEY``.
    """
    lines = [
        "#!/bin/sh",
        "# Generated from infra/access.yaml by `osteo access render-minio`; do not edit.",
        "set -eu",
        'mc alias set osteo "${MINIO_URL:-http://minio:9000}" "$MINIO_ROOT_USER" '
        '"$MINIO_ROOT_PASSWORD"',
    ]
    lines += [f"mc mb --ignore-existing osteo/{s['bucket']}" for s in matrix["stores"].values()]
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
