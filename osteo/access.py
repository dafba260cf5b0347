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
