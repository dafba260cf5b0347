"""Configuration: pipeline parameters from ``params.yaml``, storage settings from the environment.

Parameters that shape the data or the model live in ``params.yaml`` so that DVC tracks them
(``dvc params diff``). Where the data lives and who may reach it (endpoint, buckets, keys, TLS)
comes from the environment, so that MinIO, AWS S3 and SeaweedFS are interchangeable:

``OSTEO_S3_ENDPOINT``          S3 endpoint URL, e.g. ``https://minio.practice.local:9000``
``OSTEO_S3_REGION``            region name (default ``us-east-1``)
``OSTEO_S3_CA_BUNDLE``         CA certificate used to verify the endpoint's TLS certificate
``OSTEO_S3_REQUIRE_TLS``       ``1`` refuses any endpoint that is not ``https://``
``OSTEO_CREDENTIALS_FILE``     JSON file mapping each role to its access and secret key
``OSTEO_<ROLE>_ACCESS_KEY``    per-role keys; override the credentials file
``OSTEO_<ROLE>_SECRET_KEY``
``OSTEO_BUCKET_<STORE>``       bucket of a store, overriding ``infra/access.yaml``
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
ACCESS_MATRIX_FILE = PACKAGE_ROOT / "infra" / "access.yaml"


class ConfigError(Exception):
    """A setting is missing or unusable; the message names the setting."""


@dataclass(frozen=True)
class Credentials:
    """Access key pair of one role."""

    access_key: str
    secret_key: str


@dataclass(frozen=True)
class StorageSettings:
    """Where the S3 endpoint is and how to reach it.

    Attributes:
        endpoint_url: the S3 endpoint, ``http://`` or ``https://``.
        region: the region name sent in signatures.
        ca_bundle: CA certificate file to verify TLS, or None for the system store.
        require_tls: refuse plain-HTTP endpoints when True.
        credentials_file: JSON file of role keys, or None to use only environment keys.
    """

    endpoint_url: str
    region: str = "us-east-1"
    ca_bundle: str | None = None
    require_tls: bool = False
    credentials_file: Path | None = None

    def credentials(self, role: str) -> Credentials:
        """Return the keys of ``role``, from the environment first, then the credentials file.

        Raises:
            ConfigError: when no keys are configured for the role.
        """
        prefix = f"OSTEO_{role.upper()}_"
        access, secret = (
            os.environ.get(prefix + "ACCESS_KEY"),
            os.environ.get(prefix + "SECRET_KEY"),
        )
        if access and secret:
            return Credentials(access, secret)
        if self.credentials_file and self.credentials_file.exists():
            keys = json.loads(self.credentials_file.read_text()).get(role)
            if keys:
                return Credentials(keys["access_key"], keys["secret_key"])
        raise ConfigError(
            f"no S3 keys for role '{role}': set {prefix}ACCESS_KEY and {prefix}SECRET_KEY "
            f"or add the role to OSTEO_CREDENTIALS_FILE ({self.credentials_file})"
        )


def storage_settings() -> StorageSettings:
    """Read the storage settings from the environment.

    Raises:
        ConfigError: when no endpoint is configured, TLS is required and the endpoint is plain
            HTTP, or the CA bundle is not a file.
    """
    endpoint = os.environ.get("OSTEO_S3_ENDPOINT", "").strip()
    if not endpoint:
        raise ConfigError("OSTEO_S3_ENDPOINT is not set (the S3 endpoint URL of the stores)")
    require_tls = os.environ.get("OSTEO_S3_REQUIRE_TLS", "0").lower() in {"1", "true", "yes"}
    if require_tls and not endpoint.startswith("https://"):
        raise ConfigError(f"OSTEO_S3_REQUIRE_TLS is set but OSTEO_S3_ENDPOINT is {endpoint}")
    ca_bundle = os.environ.get("OSTEO_S3_CA_BUNDLE") or None
    if ca_bundle and not Path(ca_bundle).is_file():
        raise ConfigError(f"OSTEO_S3_CA_BUNDLE names {ca_bundle}, which is not a file")
    credentials_file = os.environ.get("OSTEO_CREDENTIALS_FILE")
    return StorageSettings(
        endpoint_url=endpoint,
        region=os.environ.get("OSTEO_S3_REGION", "us-east-1"),
        ca_bundle=ca_bundle,
        require_tls=require_tls,
        credentials_file=Path(credentials_file) if credentials_file else None,
    )


def load_access_matrix(path: Path = ACCESS_MATRIX_FILE) -> dict[str, Any]:
    """Load the access matrix (stores and roles) from ``infra/access.yaml``."""
    with path.open() as handle:
        matrix: dict[str, Any] = yaml.safe_load(handle)
    return matrix


def bucket(store: str) -> str:
    """Return the bucket of a store, e.g. ``bucket("training")``.

    Raises:
        ConfigError: when the store is not declared in the access matrix.
    """
    override = os.environ.get(f"OSTEO_BUCKET_{store.upper()}")
    if override:
        return override
    stores = load_access_matrix()["stores"]
    if store not in stores:
        raise ConfigError(f"unknown store '{store}'; declared stores: {', '.join(stores)}")
    return str(stores[store]["bucket"])


def load_params(project_dir: Path | str = ".") -> dict[str, Any]:
    """Load ``params.yaml`` of a project directory.

    Raises:
        ConfigError: when the file is missing.
    """
    path = Path(project_dir) / "params.yaml"
    if not path.exists():
        raise ConfigError(f"{path} not found: run osteo from the project directory")
    with path.open() as handle:
        params: dict[str, Any] = yaml.safe_load(handle)
    return params
