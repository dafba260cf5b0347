"""Object storage: every data read and write of osteo goes through the S3 API.

Clients are made per role of the access matrix, so a stage can only do what its service
identity is allowed to do, and the server enforces it (controls 4.10 and 4.11). Endpoint, keys
and TLS verification come from ``osteo.config.storage_settings``: boto3, s3fs and the DVC remote
all verify the server's certificate against ``OSTEO_S3_CA_BUNDLE`` when it is set, and
``OSTEO_S3_REQUIRE_TLS=1`` refuses a plain-HTTP endpoint before any key is used (control 4.8,
secure the transit of the collected data).
"""

from __future__ import annotations

from typing import Any

import boto3
import s3fs
from botocore.config import Config
from botocore.exceptions import ClientError

from osteo.config import StorageSettings, storage_settings

_CLIENT_CONFIG = Config(
    signature_version="s3v4",
    s3={"addressing_style": "path"},
    retries={"max_attempts": 3, "mode": "standard"},
)


def s3_client(role: str, settings: StorageSettings | None = None) -> Any:
    """Return a boto3 S3 client acting as ``role``.

    Args:
        role: a role of the access matrix, e.g. ``svc_prepare``.
        settings: storage settings; read from the environment when omitted.

    Raises:
        ConfigError: when the endpoint or the role's keys are not configured.
    """
    settings = settings or storage_settings()
    keys = settings.credentials(role)
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        aws_access_key_id=keys.access_key,
        aws_secret_access_key=keys.secret_key,
        verify=settings.ca_bundle if settings.ca_bundle else True,
        config=_CLIENT_CONFIG,
    )


def s3_filesystem(role: str, settings: StorageSettings | None = None) -> s3fs.S3FileSystem:
    """Return an fsspec filesystem over S3 acting as ``role`` (for pandas and pyarrow)."""
    settings = settings or storage_settings()
    keys = settings.credentials(role)
    client_kwargs: dict[str, Any] = {
        "endpoint_url": settings.endpoint_url,
        "region_name": settings.region,
    }
    if settings.ca_bundle:
        client_kwargs["verify"] = settings.ca_bundle
    return s3fs.S3FileSystem(
        key=keys.access_key, secret=keys.secret_key, client_kwargs=client_kwargs,
        config_kwargs={"s3": {"addressing_style": "path"}}, skip_instance_cache=True,
    )


def dvc_remote_settings(role: str, settings: StorageSettings | None = None) -> dict[str, str]:
    """Settings for a DVC S3 remote acting as ``role`` (written to ``.dvc/config.local``)."""
    settings = settings or storage_settings()
    keys = settings.credentials(role)
    remote = {
        "endpointurl": settings.endpoint_url,
        "region": settings.region,
        "access_key_id": keys.access_key,
        "secret_access_key": keys.secret_key,
    }
    if settings.ca_bundle:
        remote["ssl_verify"] = settings.ca_bundle
    return remote


def list_objects(client: Any, bucket_name: str, prefix: str = "") -> list[dict[str, Any]]:
    """Every object summary (``Key``, ``Size``, ``LastModified``) under ``prefix``, all pages.

    Raises:
        botocore.exceptions.ClientError: when the store refuses the listing.
    """
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket_name, Prefix=prefix)
    return [item for page in pages for item in page.get("Contents", [])]


# What S3 servers answer when a conditional write loses to another writer (AWS, MinIO and
# SeaweedFS differ in the code).
CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


def error_code(error: Exception) -> str:
    """The S3 error code of a botocore error, or its type name; for messages naming no data."""
    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code", "error"))
    return type(error).__name__


def put_conditionally(client: Any, bucket_name: str, key: str, body: bytes,
                      **arguments: Any) -> bool:
    """``put_object`` with a precondition (``IfNoneMatch="*"`` or ``IfMatch=etag``).

    Returns:
        False when the precondition failed: another writer was first.

    Raises:
        botocore.exceptions.ClientError, BotoCoreError: on any other failure.
    """
    try:
        client.put_object(Bucket=bucket_name, Key=key, Body=body, **arguments)
    except ClientError as error:
        if error_code(error) in CONFLICT_CODES:
            return False
        raise
    return True
