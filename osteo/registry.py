"""Model registry: every trained version with its evidence, and the champion alias, in S3.

Every evaluated model is registered, accepted or not, so that the record of what was trained
and why it was or was not used is never lost (control 4.2, document the diagnostic system).
Only a version that met the accuracy criteria can become the champion the diagnostic system
serves (control 4.25, define accuracy criteria).

Objects in the bucket of the ``models`` store (written by the ``svc_train`` role):

``versions/<version>/model.ckpt``     the checkpoint, byte for byte
``versions/<version>/metrics.json``   the evaluation's metrics document
``versions/<version>/params.yaml``    the parameters used
``versions/<version>/model_card.md``  the model card
``versions/<version>/manifest.json``  version, lineage, status, reasons and file hashes
``aliases/champion.json``             the version in use and the one it replaced

Writes are ordered so that a failure leaves nothing half-visible: a version's files first, its
manifest last (a version exists once its manifest does), and the alias only by ``promote``,
after the version it names is complete. A version id is the UTC registration time and the
first 8 hex digits of the checkpoint's sha256, e.g. ``20250301T101500Z-3fa2c1d0``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from botocore.exceptions import ClientError

from osteo.config import bucket
from osteo.digest import file_sha256
from osteo.layout import Layout
from osteo.model_card import Lineage, render_model_card
from osteo.storage import s3_client

logger = logging.getLogger(__name__)

STORE = "models"
DEFAULT_ROLE = "svc_train"
CHECKPOINT = Path("data/model/model.ckpt")
METRICS = Path("reports/metrics.json")
MODEL_CARD = Path("reports/model_card.md")
CHAMPION_KEY = "aliases/champion.json"
MANIFEST = "manifest.json"
VERSION_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")
_MISSING = {"NoSuchKey", "404", "NotFound"}


class RegistryError(Exception):
    """The registry cannot do what was asked; the message says why."""


class VersionNotFound(RegistryError):
    """No complete version has this id."""


class PromotionRefused(RegistryError):
    """The version did not meet the accuracy criteria, so it cannot become champion."""


# ---------------------------------------------------------------- registration


def register(
    layout: Layout,
    params: dict[str, Any],
    data_version: str,
    *,
    export_manifest_sha256: str | None = None,
    role: str = DEFAULT_ROLE,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Register the evaluated model of a project as a new version, accepted or rejected.

    Reads ``data/model/model.ckpt`` and ``reports/metrics.json``, renders the model card
    (also written to ``reports/model_card.md``) and uploads everything, manifest last.

    Args:
        layout: paths of the project.
        params: the parameters the model was trained and evaluated with.
        data_version: DVC hash of the split dataset the model was trained on.
        export_manifest_sha256: sha256 of the export's file manifest; read from
            ``work/ingest/manifest.csv`` when omitted and the file is present.
        role: role of the access matrix acting on the models store.
        now: registration time (UTC); the current time when omitted.

    Returns:
        The version's manifest.

    Raises:
        RegistryError: when the checkpoint or the metrics are missing or unusable, or the
            version id is already taken.
        ConfigError: when the storage or the role's keys are not configured.
    """
    # 1. Inputs and lineage.
    checkpoint, metrics = _read_evaluated_model(layout)
    now = (now or datetime.now(UTC)).astimezone(UTC)
    checkpoint_sha = file_sha256(checkpoint)
    if export_manifest_sha256 is None and layout.manifest.exists():
        export_manifest_sha256 = file_sha256(layout.manifest)
    lineage = Lineage(
        version=f"{now:%Y%m%dT%H%M%SZ}-{checkpoint_sha[:8]}",
        created_at=now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        data_version=data_version, code_version=code_version(layout.root),
        params_sha256=params_sha256(params), checkpoint_sha256=checkpoint_sha,
        export_manifest_sha256=export_manifest_sha256,
    )

    # 2. Model card, locally and for the registry.
    card = render_model_card(metrics, params, lineage)
    (layout.root / MODEL_CARD).parent.mkdir(parents=True, exist_ok=True)
    (layout.root / MODEL_CARD).write_text(card, encoding="utf-8")

    # 3. Upload: the version's files, then its manifest.
    client, name = s3_client(role), bucket(STORE)
    prefix = f"versions/{lineage.version}/"
    if _exists(client, name, prefix + MANIFEST):
        raise RegistryError(f"version {lineage.version} is already registered")
    files = _upload_version_files(client, name, prefix, checkpoint, {
        "metrics.json": json.dumps(metrics, indent=2).encode(),
        "params.yaml": yaml.safe_dump(params, sort_keys=False).encode(),
        "model_card.md": card.encode(),
    })
    manifest = _manifest(lineage, params, metrics, files)
    _put_json(client, name, prefix + MANIFEST, manifest)
    logger.info("registered model version %s (%s) in s3://%s/%s", lineage.version,
                manifest["status"], name, prefix)
    return manifest


def _read_evaluated_model(layout: Layout) -> tuple[Path, dict[str, Any]]:
    checkpoint, metrics_path = layout.root / CHECKPOINT, layout.root / METRICS
    if not checkpoint.exists():
        raise RegistryError(f"{checkpoint} not found: run the train stage first")
    if not metrics_path.exists():
        raise RegistryError(f"{metrics_path} not found: run the evaluate stage first")
    try:
        metrics: dict[str, Any] = json.loads(metrics_path.read_text())
        accepted = metrics["acceptance"]["accepted"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RegistryError(
            f"{metrics_path} holds no acceptance decision: run the evaluate stage again"
        ) from None
    if not isinstance(accepted, bool):
        raise RegistryError(f"{metrics_path}: acceptance.accepted must be true or false")
    return checkpoint, metrics


def _upload_version_files(
    client: Any, name: str, prefix: str, checkpoint: Path, documents: dict[str, bytes]
) -> dict[str, dict[str, Any]]:
    """Upload the checkpoint and the documents; on failure, remove what was uploaded."""
    uploaded: list[str] = []
    try:
        client.upload_file(str(checkpoint), name, prefix + "model.ckpt")
        uploaded.append(prefix + "model.ckpt")
        files = {"model.ckpt": {"sha256": file_sha256(checkpoint),
                                "bytes": checkpoint.stat().st_size}}
        for file_name, body in documents.items():
            client.put_object(Bucket=name, Key=prefix + file_name, Body=body)
            uploaded.append(prefix + file_name)
            files[file_name] = {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}
    except Exception:
        _remove_quietly(client, name, uploaded)
        raise
    return files


def _remove_quietly(client: Any, name: str, keys: list[str]) -> None:
    # Without its manifest a version is invisible; removing its files only saves space.
    for key in keys:
        try:
            client.delete_object(Bucket=name, Key=key)
        except ClientError:
            logger.warning("could not remove %s after a failed registration", key)


def _manifest(
    lineage: Lineage, params: dict[str, Any], metrics: dict[str, Any],
    files: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    acceptance = metrics["acceptance"]
    return {
        "version": lineage.version,
        "created_at": lineage.created_at,
        "status": "accepted" if acceptance["accepted"] else "rejected",
        "reasons": list(acceptance["reasons"]),
        "data_version": lineage.data_version,
        "code_version": lineage.code_version,
        "export_manifest_sha256": lineage.export_manifest_sha256,
        "params_sha256": lineage.params_sha256,
        "checkpoint_sha256": lineage.checkpoint_sha256,
        "params": params,
        "metrics": metrics,
        "files": files,
    }


# ---------------------------------------------------------------- reading and promotion


def get(version: str, *, role: str = DEFAULT_ROLE) -> dict[str, Any]:
    """Return the manifest of a registered version.

    Raises:
        VersionNotFound: when no complete version has this id.
    """
    return _get_manifest(s3_client(role), bucket(STORE), version)


def list_versions(*, role: str = DEFAULT_ROLE) -> list[str]:
    """Return the ids of every complete version, oldest first."""
    client, name = s3_client(role), bucket(STORE)
    versions = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name,
                                                                  Prefix="versions/"):
        for item in page.get("Contents", []):
            parts = item["Key"].split("/")
            if len(parts) == 3 and parts[2] == MANIFEST and VERSION_ID.match(parts[1]):
                versions.append(parts[1])
    return sorted(versions)


def champion(*, role: str = DEFAULT_ROLE) -> str | None:
    """Return the version the champion alias points to, or None before any promotion."""
    alias = _champion_alias(s3_client(role), bucket(STORE))
    return None if alias is None else str(alias["version"])


def promote(
    version: str, *, role: str = DEFAULT_ROLE, now: datetime | None = None
) -> dict[str, Any]:
    """Point the champion alias at ``version``, only if it met the accuracy criteria.

    The status is read from the version's manifest in the registry, not from the caller.

    Args:
        version: a registered version id.
        role: role of the access matrix acting on the models store.
        now: promotion time (UTC); the current time when omitted.

    Returns:
        The new alias document (version, promotion time, checkpoint hash, previous version).

    Raises:
        VersionNotFound: when no complete version has this id.
        PromotionRefused: when the version was rejected; the alias does not move.
        RegistryError: when the version's checkpoint is missing or does not match its manifest.
    """
    client, name = s3_client(role), bucket(STORE)
    manifest = _get_manifest(client, name, version)
    current = _champion_alias(client, name)
    previous = None if current is None else current["version"]
    if manifest["status"] != "accepted":
        raise PromotionRefused(
            f"version {version} was rejected by the accuracy criteria and cannot be champion "
            f"({'; '.join(manifest['reasons'])}); the champion remains {previous or 'unset'}"
        )
    _check_checkpoint_present(client, name, manifest)
    alias = {
        "alias": "champion",
        "version": version,
        "checkpoint_sha256": manifest["checkpoint_sha256"],
        "promoted_at": (now or datetime.now(UTC)).astimezone(UTC)
        .isoformat(timespec="seconds").replace("+00:00", "Z"),
        "previous": previous,
    }
    _put_json(client, name, CHAMPION_KEY, alias)
    logger.info("champion alias moved from %s to %s", previous or "unset", version)
    return alias


def download_checkpoint(
    version: str, destination: Path, *, role: str = DEFAULT_ROLE
) -> Path:
    """Download a version's checkpoint and check it against the sha256 of its manifest.

    Raises:
        VersionNotFound: when no complete version has this id.
        RegistryError: when the downloaded file does not match the manifest (it is removed).
    """
    client, name = s3_client(role), bucket(STORE)
    manifest = _get_manifest(client, name, version)
    destination.parent.mkdir(parents=True, exist_ok=True)
    client.download_file(name, f"versions/{version}/model.ckpt", str(destination))
    if file_sha256(destination) != manifest["checkpoint_sha256"]:
        destination.unlink()
        raise RegistryError(f"checkpoint of version {version} does not match its manifest's "
                            "sha256; it was not kept")
    return destination


def _get_manifest(client: Any, name: str, version: str) -> dict[str, Any]:
    if not VERSION_ID.match(version):
        raise VersionNotFound(f"'{version}' is not a version id (expected e.g. "
                              "20250301T101500Z-3fa2c1d0)")
    document = _get_json(client, name, f"versions/{version}/{MANIFEST}")
    if document is None:
        raise VersionNotFound(f"no registered version {version} in s3://{name}")
    return document


def _champion_alias(client: Any, name: str) -> dict[str, Any] | None:
    return _get_json(client, name, CHAMPION_KEY)


def _check_checkpoint_present(client: Any, name: str, manifest: dict[str, Any]) -> None:
    key = f"versions/{manifest['version']}/model.ckpt"
    try:
        size = client.head_object(Bucket=name, Key=key)["ContentLength"]
    except ClientError as error:
        if error.response["Error"]["Code"] in _MISSING:
            raise RegistryError(f"checkpoint {key} is missing; not promoted") from None
        raise
    if size != manifest["files"]["model.ckpt"]["bytes"]:
        raise RegistryError(f"checkpoint {key} is {size} bytes, its manifest says "
                            f"{manifest['files']['model.ckpt']['bytes']}; not promoted")


# ---------------------------------------------------------------- storage helpers


def _exists(client: Any, name: str, key: str) -> bool:
    try:
        client.head_object(Bucket=name, Key=key)
    except ClientError as error:
        if error.response["Error"]["Code"] in _MISSING:
            return False
        raise
    return True


def _get_json(client: Any, name: str, key: str) -> dict[str, Any] | None:
    try:
        body = client.get_object(Bucket=name, Key=key)["Body"].read()
    except ClientError as error:
        if error.response["Error"]["Code"] in _MISSING:
            return None
        raise
    document: dict[str, Any] = json.loads(body)
    return document


def _put_json(client: Any, name: str, key: str, document: dict[str, Any]) -> None:
    client.put_object(Bucket=name, Key=key, Body=json.dumps(document, indent=2).encode(),
                      ContentType="application/json")


# ---------------------------------------------------------------- lineage helpers


def params_sha256(params: dict[str, Any]) -> str:
    """sha256 of the parameters as canonical JSON (sorted keys), independent of YAML layout."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def code_version(project_dir: Path) -> str:
    """Git commit of the project, with ``-dirty`` when tracked files have uncommitted changes.

    Returns:
        The commit hash, or ``unknown`` when git is missing or the directory is not in a
        git repository.
    """
    git = shutil.which("git")
    if git is None:
        return "unknown"
    head = subprocess.run(  # noqa: S603 - git found on PATH, fixed arguments
        [git, "rev-parse", "HEAD"], cwd=project_dir, capture_output=True, text=True,
        check=False,
    )
    if head.returncode != 0:
        return "unknown"
    status = subprocess.run(  # noqa: S603 - git found on PATH, fixed arguments
        [git, "status", "--porcelain", "--untracked-files=no"], cwd=project_dir,
        capture_output=True, text=True, check=False,
    )
    dirty = "-dirty" if status.returncode == 0 and status.stdout.strip() else ""
    return head.stdout.strip() + dirty
