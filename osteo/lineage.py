"""Lineage register: every dataset version pushed to the training store, when, and of what.

Control 4.19 (define and implement a data retention policy) deletes training data two years
after it was collected; that needs, for each dataset version, the day it was collected and the
exact remote objects that hold it. Control 4.16 (generate logs and perform internal audit) needs
the version to stay traceable after its data is gone. The register keeps both, one JSON object
per version, next to the DVC remote it describes (the training store)::

    <remote root>/lineage/versions/<version_id>.json

For the remote ``s3://osteo-training/dvc`` that is ``lineage/versions/...`` in the bucket
``osteo-training``. A version holds:

* ``data_version``: the DVC hash of ``data/split``, and ``outputs``: the hash DVC recorded in
  ``dvc.lock`` for every output of the data stages (``version_id`` is derived from them);
* ``manifest_sha256``: sha256 of the export manifest ``work/ingest/manifest.csv``;
* ``collected_on``: UTC day of the preparation run (the retention period counts from it);
* ``objects``: the keys of the DVC objects (``<remote>/files/md5/..``) making up the version,
  read from ``dvc.lock`` and the ``.dir`` manifests of the local DVC cache, and
  ``total_bytes``, their size;
* ``patient_ids`` and ``image_ids``: the pseudonyms the version holds, so that identity-vault
  entries are kept while a live version uses them;
* ``status``: ``live``, or ``purged_for_retention`` with ``purged_on`` and ``purge_reason``.
  A purged entry keeps its hashes and counts but drops its pseudonym lists.

Nothing identifying is written: hashes, pseudonyms, counts and a date. The register is written
by the data preparation flow and updated by the retention flow, both acting as ``svc_prepare``
(the service identity that writes the training store; svc_retention may only list and delete).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import yaml
from botocore.exceptions import BotoCoreError, ClientError
from configobj import ConfigObj

from osteo import dvc
from osteo.audit import file_sha256
from osteo.config import bucket
from osteo.layout import Layout
from osteo.storage import error_code, list_objects, put_conditionally, s3_client

logger = logging.getLogger(__name__)

LINEAGE_ROLE = "svc_prepare"
LIVE = "live"
PURGED = "purged_for_retention"
DATA_STAGES = ("ingest", "pseudonymise", "validate", "preprocess", "split")
DATA_VERSION_PATH = "data/split"
PSEUDONYM_TABLES = ("data/pseudonymised/records.parquet",)
VERSIONS_FOLDER = "lineage/versions/"


class LineageError(Exception):
    """The lineage register cannot be built, read or written; the message names the file or key."""


# ---------------------------------------------------------------- where the register lives


@dataclass(frozen=True)
class RemoteLocation:
    """The DVC remote of the training store, and where its lineage register is.

    Attributes:
        url: the remote URL, e.g. ``s3://osteo-training/dvc``.
        bucket: the bucket of the URL.
        prefix: the key prefix of the remote inside the bucket, ending with ``/`` (or empty).
    """

    url: str
    bucket: str
    prefix: str

    @property
    def objects_prefix(self) -> str:
        """Key prefix of the content-addressed DVC objects (DVC 3 layout)."""
        return f"{self.prefix}files/md5/"

    @property
    def versions_prefix(self) -> str:
        """Key prefix of the lineage entries: beside the remote's folder, not inside it."""
        parent = self.prefix.rstrip("/").rpartition("/")[0]
        return f"{parent}/{VERSIONS_FOLDER}" if parent else VERSIONS_FOLDER

    def object_key(self, md5: str) -> str:
        """Key of a DVC object from the hash recorded by DVC (``.dir`` suffix included)."""
        return f"{self.objects_prefix}{md5[:2]}/{md5[2:]}"

    def version_key(self, version_id: str) -> str:
        """Key of the lineage entry of a version."""
        return f"{self.versions_prefix}{version_id}.json"


def remote_location(project_dir: Path, remote: str = dvc.REMOTE_NAME) -> RemoteLocation:
    """The training remote of a DVC project, from ``.dvc/config.local`` then ``.dvc/config``.

    Without a configured remote, the URL ``osteo.dvc.configure_remote`` would set is used.

    Args:
        project_dir: the DVC project.
        remote: the remote's name.

    Returns:
        The remote's URL, bucket and key prefix.

    Raises:
        LineageError: when the configured URL is not an ``s3://`` URL.
    """
    url = f"s3://{bucket('training')}/dvc"
    for name in ("config", "config.local"):  # the local file overrides the shared one
        path = Path(project_dir) / ".dvc" / name
        if path.exists():
            section = ConfigObj(str(path), encoding="utf-8").get(f'remote "{remote}"', {})
            url = str(section.get("url", url))
    if not url.startswith("s3://"):
        raise LineageError(f"DVC remote '{remote}' is {url}; the training store is an s3:// URL")
    bucket_name, _, prefix = url[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    return RemoteLocation(url, bucket_name, f"{prefix}/" if prefix else "")


# ---------------------------------------------------------------- one dataset version


@dataclass(frozen=True)
class DatasetVersion:
    """One entry of the lineage register (see the module docstring for the fields)."""

    version_id: str
    data_version: str | None
    outputs: dict[str, str]
    manifest_sha256: str | None
    collected_on: date
    remote: str
    objects: list[str]
    total_bytes: int
    patient_ids: list[str] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)
    patients: int = 0
    images: int = 0
    status: str = LIVE
    purged_on: date | None = None
    purge_reason: str | None = None

    @property
    def live(self) -> bool:
        return self.status == LIVE

    def to_json(self) -> bytes:
        """The entry as stored: sorted keys, ISO dates."""
        document = asdict(self)
        document["collected_on"] = self.collected_on.isoformat()
        document["purged_on"] = self.purged_on.isoformat() if self.purged_on else None
        return json.dumps(document, sort_keys=True, indent=1).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, key: str = "") -> DatasetVersion:
        """Parse a stored entry.

        Raises:
            LineageError: when the bytes are not a lineage entry.
        """
        try:
            raw: dict[str, Any] = json.loads(data)
            raw["collected_on"] = date.fromisoformat(raw["collected_on"])
            purged_on = raw.get("purged_on")
            raw["purged_on"] = date.fromisoformat(purged_on) if purged_on else None
            return cls(**raw)
        except (ValueError, KeyError, TypeError) as error:
            raise LineageError(f"{key or 'entry'} is not a lineage entry ({error})") from None


def mark_purged(version: DatasetVersion, purged_on: date, reason: str) -> DatasetVersion:
    """The entry of a version whose data was deleted: hashes and counts stay, pseudonyms go.

    Args:
        version: the live entry.
        purged_on: the day of the deletion.
        reason: why, as a code (``retention_period``).

    Returns:
        The purged entry.
    """
    return replace(version, status=PURGED, purged_on=purged_on, purge_reason=reason,
                   patient_ids=[], image_ids=[])


def describe_version(
    project_dir: Path,
    collected_on: date,
    stages: Iterable[str] = DATA_STAGES,
    pseudonym_tables: Iterable[str] = PSEUDONYM_TABLES,
) -> DatasetVersion:
    """Describe the dataset version recorded in a project's ``dvc.lock`` (no store access).

    Args:
        project_dir: the DVC project, after ``dvc commit`` of the data stages.
        collected_on: the day the data was collected (the preparation run).
        stages: the data stages whose outputs make up the version.
        pseudonym_tables: Parquet tables, relative to the project, whose ``patient_id`` and
            ``image_id`` columns list the pseudonyms the version holds.

    Returns:
        The live entry of the version.

    Raises:
        LineageError: when dvc.lock records none of the stages, or a ``.dir`` manifest of a
            pushed output is missing from the local DVC cache.
    """
    root = Path(project_dir)

    # 1. Every output's hash, and which outputs DVC pushes to the training remote.
    outputs = _locked_outputs(root, tuple(stages))
    declared = _pushed_paths(root)
    pushed = {path: md5 for path, md5 in outputs.items() if declared.get(path, True)}

    # 2. The objects of the pushed outputs: the hash itself, plus a directory's files.
    location = remote_location(root)
    cache = _cache_dir(root)
    hashes = sorted({h for md5 in pushed.values() for h in _object_hashes(cache, md5)})
    objects = [location.object_key(h) for h in hashes]
    size = sum(_cache_path(cache, h).stat().st_size for h in hashes
               if _cache_path(cache, h).exists())

    # 3. The export it came from and the pseudonyms it holds.
    manifest = Layout(root).manifest
    patients, images = _pseudonyms(root, pseudonym_tables)
    version_id = hashlib.sha256(json.dumps(outputs, sort_keys=True).encode()).hexdigest()[:32]
    return DatasetVersion(
        version_id=version_id, data_version=outputs.get(DATA_VERSION_PATH),
        outputs=outputs, manifest_sha256=file_sha256(manifest) if manifest.exists() else None,
        collected_on=collected_on, remote=location.url, objects=objects,
        total_bytes=size,
        patient_ids=patients, image_ids=images, patients=len(patients), images=len(images),
    )


def _locked_outputs(root: Path, stages: tuple[str, ...]) -> dict[str, str]:
    locked = dvc.lock(root)["stages"]
    outputs = {
        str(out["path"]): str(out.get("md5") or out.get("hash"))
        for stage in stages for out in locked.get(stage, {}).get("outs", [])
    }
    if not outputs:
        raise LineageError(f"{root / 'dvc.lock'} records none of the stages {', '.join(stages)}")
    return outputs


def _pushed_paths(root: Path) -> dict[str, bool]:
    """For every output declared in dvc.yaml: whether DVC pushes it to the training remote."""
    dvc_yaml = root / "dvc.yaml"
    document = yaml.safe_load(dvc_yaml.read_text()) if dvc_yaml.exists() else None
    pushed: dict[str, bool] = {}
    for spec in ((document or {}).get("stages") or {}).values():
        for kind in ("outs", "metrics", "plots"):
            for entry in spec.get(kind) or []:
                path, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
                pushed[str(path)] = _is_pushed(kind, options or {})
    return pushed


def _is_pushed(kind: str, options: dict[str, Any]) -> bool:
    # DVC caches every output, metric and plot unless told otherwise; an output with another
    # remote (models) goes to another store.
    cached = options.get("cache", True) is not False
    return (cached and options.get("push", True) is not False
            and options.get("remote") in (None, dvc.REMOTE_NAME))


def _cache_dir(root: Path) -> Path:
    configured = dvc.run_dvc(root, "cache", "dir").strip()
    path = Path(configured)
    return path if path.is_absolute() else root / path


def _cache_path(cache: Path, md5: str) -> Path:
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def _object_hashes(cache: Path, md5: str) -> list[str]:
    if not md5.endswith(".dir"):
        return [md5]
    manifest = _cache_path(cache, md5)
    if not manifest.exists():
        raise LineageError(f"directory manifest {manifest} is not in the DVC cache; run dvc pull")
    entries = json.loads(manifest.read_text())
    return [md5, *(str(entry["md5"]) for entry in entries)]


def _pseudonyms(root: Path, tables: Iterable[str]) -> tuple[list[str], list[str]]:
    found: dict[str, set[str]] = {"patient_id": set(), "image_id": set()}
    for relative in tables:
        path = root / relative
        if not path.exists():
            logger.warning("lineage: %s not found; its pseudonyms are not recorded", relative)
            continue
        columns = [c for c in found if c in pq.read_schema(path).names]
        table = pd.read_parquet(path, columns=columns)
        for column in columns:
            found[column].update(table[column].dropna().astype(str))
    return sorted(found["patient_id"]), sorted(found["image_id"])


# ---------------------------------------------------------------- the register in the store


def _utc_now() -> datetime:
    return datetime.now(UTC)


def record_dataset_version(
    project_dir: Path | str,
    stages: Iterable[str] = DATA_STAGES,
    role: str = LINEAGE_ROLE,
    clock: Callable[[], datetime] = _utc_now,
    pseudonym_tables: Iterable[str] = PSEUDONYM_TABLES,
) -> DatasetVersion:
    """Record the dataset version just pushed in the lineage register of the training store.

    Call it after ``dvc push``. Recording the same version twice keeps the first entry (and so
    the first collection day); a version purged for retention and pushed again gets a new entry.

    Args:
        project_dir: the DVC project.
        stages: the data stages whose outputs make up the version.
        role: the role writing the training store.
        clock: the current UTC time (injectable, for tests and simulations).
        pseudonym_tables: tables listing the version's pseudonyms (see ``describe_version``).

    Returns:
        The entry as stored.

    Raises:
        LineageError: when the version cannot be described or the store refuses the write.
        ConfigError: when the storage settings or the role's keys are missing.
    """
    root = Path(project_dir)
    collected_on = clock().astimezone(UTC).date()
    version = describe_version(root, collected_on, stages, pseudonym_tables)
    location = remote_location(root)
    client = s3_client(role)
    key = location.version_key(version.version_id)
    if not _create(client, location.bucket, key, version.to_json()):
        existing = DatasetVersion.from_json(_read(client, location.bucket, key), key)
        if existing.live:
            logger.info("lineage: version %s already recorded (collected on %s)",
                        existing.version_id, existing.collected_on)
            return existing
        save_version(version, location, client)
    logger.info("lineage: recorded version %s (%d objects, %d bytes) in s3://%s/%s",
                version.version_id, len(version.objects), version.total_bytes, location.bucket,
                key)
    return version


def load_versions(location: RemoteLocation, client: Any) -> list[DatasetVersion]:
    """Every entry of the register, oldest collection first.

    Args:
        location: the training remote (see ``remote_location``).
        client: a boto3 client of a role that may read the training store.

    Raises:
        LineageError: when the store refuses the listing or a read, or an entry is unreadable.
    """
    versions = []
    for key in _list_keys(client, location.bucket, location.versions_prefix):
        if key.endswith(".json"):
            versions.append(DatasetVersion.from_json(_read(client, location.bucket, key), key))
    return sorted(versions, key=lambda v: (v.collected_on, v.version_id))


def save_version(version: DatasetVersion, location: RemoteLocation, client: Any) -> str:
    """Write (or replace) the entry of a version; returns its key.

    Raises:
        LineageError: when the store refuses the write.
    """
    key = location.version_key(version.version_id)
    try:
        client.put_object(Bucket=location.bucket, Key=key, Body=version.to_json(),
                          ContentType="application/json")
    except (ClientError, BotoCoreError) as error:
        raise LineageError(f"cannot write lineage entry {key}: {error_code(error)}") from None
    return key


def _create(client: Any, bucket_name: str, key: str, body: bytes) -> bool:
    try:
        return put_conditionally(client, bucket_name, key, body, IfNoneMatch="*",
                                 ContentType="application/json")
    except (ClientError, BotoCoreError) as error:
        raise LineageError(f"cannot write lineage entry {key}: {error_code(error)}") from None


def _read(client: Any, bucket_name: str, key: str) -> bytes:
    try:
        body: bytes = client.get_object(Bucket=bucket_name, Key=key)["Body"].read()
    except (ClientError, BotoCoreError) as error:
        raise LineageError(f"cannot read lineage entry {key}: {error_code(error)}") from None
    return body


def _list_keys(client: Any, bucket_name: str, prefix: str) -> list[str]:
    keys: list[str] = []
    try:
        keys.extend(item["Key"] for item in list_objects(client, bucket_name, prefix))
    except (ClientError, BotoCoreError) as error:
        raise LineageError(
            f"cannot list s3://{bucket_name}/{prefix}: {error_code(error)}"
        ) from None
    return keys


