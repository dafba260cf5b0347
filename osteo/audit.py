"""Audit trail: signed, hash-chained records of who did what to which object, and when.

Implements ENISA control 4.16, "generate logs and perform internal audit". Every stage, every
read of the identity vault or of a patient file, every promotion and every deletion appends one
record: who (identity and role), what (action), which objects (keys and sha256), when (UTC,
ISO 8601) and in which flow run. An auditor can then answer "who accessed this object, and
when?" (``who_accessed``) and prove that nobody edited the answer (``verify``).

Reads and writes, in the audit store (``osteo.storage.s3_client(role)``) or in a local
directory (unit tests, offline verification of an exported log), one object per entry::

    public_key.pem                  the log's ed25519 public key; pin it in the verifier
    records/<seq:012d>.json         one record, sequence numbers starting at 1
    checkpoints/<seq:012d>.json     a signed statement "the log held <seq> records, head <hash>"

Integrity:

* Each record holds its own sequence number and the previous record's hash, so editing,
  deleting or reordering records breaks the chain at the first record concerned.
* Each record and checkpoint is signed with ed25519 (non-repudiation, as 4.16 asks). The
  private key stays outside the stores: ``$OSTEO_AUDIT_KEY_FILE``, default ``.osteo/audit.key``,
  created with mode 0600 when missing.
* A checkpoint is written every ``checkpoint_every`` records and at the end of every flow
  (``AuditLog.checkpoint``). Cutting off records covered by a checkpoint is detected. Cutting
  off the tail together with the checkpoints after it is detected only against a head kept
  elsewhere (``verify(expected_head=..., expected_seq=...)``), e.g. the last checkpoint printed
  by the flow.
* Writes are conditional (``If-None-Match: *`` on S3, ``O_EXCL`` locally): a record is never
  overwritten by this code, and two writers racing for the same sequence number cannot fork
  the chain: the loser re-reads the head and appends after it. This protects against this
  code's own mistakes, not against a stolen writer key: that needs the store itself to keep
  the audit bucket append-only (versioning with object lock, a bucket policy denying deletes).

Privacy: the log is itself within the privacy impact assessment (4.16), so a record must never
carry a name, a patient reference or a birth date. ``append`` enforces a closed rule rather
than guessing what looks like a name:

* ``actor`` is a lowercase login or service identity, ``role`` a role of the access matrix,
  ``action`` a lowercase dotted code (``vault.read``), ``run_id`` an identifier without spaces.
* Object keys are path-like (no spaces or person-name separators; at least one ``/`` or a
  ``.ext`` suffix) and their hashes are sha256 hex digests.
* Every detail key declares its value type, by exact name or by suffix (see ``DETAIL_NAMES``
  and ``DETAIL_SUFFIXES``): counts (non-negative integers), numbers, sha256 digests,
  pseudonyms (``I``/``P`` + 16 hex), object keys, and codes (lowercase, no spaces, at most 64
  characters, no date-like digits). A value may also be a list of values of its key's type.
  Undeclared keys and values of any other shape are refused with ``AuditPrivacyError``, whose
  message never repeats the refused value.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from botocore.exceptions import ClientError
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from osteo.config import ConfigError, bucket, load_access_matrix
from osteo.digest import file_sha256  # noqa: F401 - part of this module's API

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT_EVERY = 50
DEFAULT_KEY_FILE = Path(".osteo") / "audit.key"
KEY_FILE_ENV = "OSTEO_AUDIT_KEY_FILE"
PUBLIC_KEY_NAME = "public_key.pem"
RECORDS = "records/"
CHECKPOINTS = "checkpoints/"
GENESIS = "0" * 64
FORMAT_VERSION = 1
MAX_APPEND_ATTEMPTS = 20
MAX_DETAILS = 32
MAX_LIST_ITEMS = 10_000

# Domain separation: a record signature can never be replayed as a checkpoint signature.
_RECORD_DOMAIN = b"osteo.audit.record.v1:"
_CHECKPOINT_DOMAIN = b"osteo.audit.checkpoint.v1:"
_ENTRY_NAME = re.compile(r"(records|checkpoints)/(\d{12})\.json")


class AuditError(Exception):
    """The audit log cannot be written or read; the message says why, without patient data."""


class AuditPrivacyError(AuditError):
    """A value given to ``append`` could identify a person; it was refused and not logged."""


class AuditStorageError(AuditError):
    """The store refused or failed an audit read or write."""


# ---------------------------------------------------------------- privacy rule


class DetailKind(Enum):
    """Value types a detail may hold; anything else is refused."""

    COUNT = "a non-negative integer"
    NUMBER = "a finite number"
    HASH = "a sha256 hex digest"
    PSEUDONYM = "a pseudonym (I or P followed by 16 lowercase hex digits)"
    OBJECT_KEY = "a path-like object key"
    CODE = "a lowercase code without spaces or dates (at most 64 characters)"


DETAIL_NAMES: dict[str, DetailKind] = {
    "records_in": DetailKind.COUNT,
    "accepted": DetailKind.COUNT,
    "quarantined": DetailKind.COUNT,
    "image_id": DetailKind.PSEUDONYM,
    "image_ids": DetailKind.PSEUDONYM,
    "patient_id": DetailKind.PSEUDONYM,
    "patient_ids": DetailKind.PSEUDONYM,
    "stage": DetailKind.CODE,
    "reason": DetailKind.CODE,
    "status": DetailKind.CODE,
    "store": DetailKind.CODE,
    "split": DetailKind.CODE,
    "model_version": DetailKind.CODE,
}
DETAIL_SUFFIXES: tuple[tuple[str, DetailKind], ...] = (
    ("_count", DetailKind.COUNT),
    ("_bytes", DetailKind.COUNT),
    ("_seconds", DetailKind.NUMBER),
    ("_ratio", DetailKind.NUMBER),
    ("_sha256", DetailKind.HASH),
    ("_key", DetailKind.OBJECT_KEY),
    ("_keys", DetailKind.OBJECT_KEY),
    ("_code", DetailKind.CODE),
)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_PSEUDONYM = re.compile(r"[IP][0-9a-f]{16}")
_CODE = re.compile(r"[a-z][a-z0-9_.:+-]{0,63}")
_DATE_LIKE = re.compile(r"\d{4}[-_.]?\d{2}[-_.]?\d{2}")
_DETAIL_KEY = re.compile(r"[a-z][a-z0-9_]{0,39}")
_ACTOR = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_OBJECT_KEY = re.compile(r"(s3://)?/?[A-Za-z0-9_=+-][A-Za-z0-9_.=+-]*(/[A-Za-z0-9_.=+-]+)*/?")
_HAS_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,8}$")


def _is_object_key(value: str) -> bool:
    if len(value) > 1024 or not _OBJECT_KEY.fullmatch(value):
        return False
    return "/" in value or bool(_HAS_EXTENSION.search(value))


def _matches(kind: DetailKind, value: Any) -> bool:
    if kind is DetailKind.COUNT:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind is DetailKind.NUMBER:
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        return is_number and math.isfinite(value)
    if not isinstance(value, str):
        return False
    if kind is DetailKind.HASH:
        return bool(_SHA256.fullmatch(value))
    if kind is DetailKind.PSEUDONYM:
        return bool(_PSEUDONYM.fullmatch(value))
    if kind is DetailKind.OBJECT_KEY:
        return _is_object_key(value)
    return bool(_CODE.fullmatch(value)) and not _DATE_LIKE.search(value)


def detail_kind(key: str) -> DetailKind | None:
    """Return the value type a detail key declares, or None when the key is not declared."""
    if key in DETAIL_NAMES:
        return DETAIL_NAMES[key]
    for suffix, kind in DETAIL_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return kind
    return None


def check_details(details: Mapping[str, Any]) -> dict[str, Any]:
    """Apply the privacy rule to a record's details.

    Args:
        details: detail key to value (or list of values).

    Returns:
        A plain copy of the details, safe to store.

    Raises:
        AuditPrivacyError: when a key is not declared or a value does not have its key's type.
    """
    if len(details) > MAX_DETAILS:
        raise AuditPrivacyError(f"at most {MAX_DETAILS} details per record")
    checked: dict[str, Any] = {}
    for position, (key, value) in enumerate(details.items(), start=1):
        kind = detail_kind(key) if isinstance(key, str) and _DETAIL_KEY.fullmatch(key) else None
        if kind is None:
            raise AuditPrivacyError(
                f"detail #{position} has an undeclared key; use one of "
                f"{', '.join(sorted(DETAIL_NAMES))} or a key ending in "
                f"{', '.join(suffix for suffix, _ in DETAIL_SUFFIXES)}"
            )
        values = value if isinstance(value, list | tuple) else [value]
        if len(values) > MAX_LIST_ITEMS or not all(_matches(kind, item) for item in values):
            raise AuditPrivacyError(f"detail '{key}' refused: it must be {kind.value}")
        checked[key] = list(values) if isinstance(value, list | tuple) else value
    return checked


@lru_cache(maxsize=1)
def _roles() -> tuple[str, ...]:
    return tuple(load_access_matrix()["roles"])


def _check_identity(actor: str, role: str, action: str, run_id: str | None) -> None:
    if not isinstance(actor, str) or not _ACTOR.fullmatch(actor):
        raise AuditPrivacyError("actor must be a lowercase login or service identity")
    roles = _roles()
    if role not in roles:
        raise AuditPrivacyError(f"role must be one of the access matrix: {', '.join(roles)}")
    if not isinstance(action, str) or not _CODE.fullmatch(action):
        raise AuditPrivacyError("action must be a lowercase dotted code, e.g. 'vault.read'")
    if run_id is not None and not _RUN_ID.fullmatch(run_id):
        raise AuditPrivacyError("run_id must be an identifier without spaces")


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class ObjectRef:
    """An object a record concerns: its key and, when known, the sha256 of its content."""

    key: str
    sha256: str | None = None


@dataclass(frozen=True)
class AuditRecord:
    """One signed entry of the audit trail."""

    seq: int
    prev: str
    time: str
    actor: str
    role: str
    action: str
    objects: tuple[ObjectRef, ...]
    run_id: str | None
    details: dict[str, Any]
    key_id: str
    hash: str = ""
    signature: str = ""

    def body(self) -> dict[str, Any]:
        """The signed content: every field except the hash and the signature."""
        return {
            "v": FORMAT_VERSION, "seq": self.seq, "prev": self.prev, "time": self.time,
            "actor": self.actor, "role": self.role, "action": self.action,
            "objects": [{"key": o.key, "sha256": o.sha256} for o in self.objects],
            "run_id": self.run_id, "details": self.details, "key_id": self.key_id,
        }

    def to_json(self) -> bytes:
        """Serialise the record as stored."""
        return _canonical({**self.body(), "hash": self.hash, "signature": self.signature})

    @classmethod
    def from_json(cls, data: bytes) -> AuditRecord:
        """Parse a stored record.

        Raises:
            AuditError: when the bytes are not a record of this format.
        """
        try:
            raw = json.loads(data)
            return cls(
                seq=int(raw["seq"]), prev=str(raw["prev"]), time=str(raw["time"]),
                actor=str(raw["actor"]), role=str(raw["role"]), action=str(raw["action"]),
                objects=tuple(ObjectRef(o["key"], o.get("sha256")) for o in raw["objects"]),
                run_id=raw.get("run_id"), details=dict(raw.get("details") or {}),
                key_id=str(raw["key_id"]), hash=str(raw["hash"]),
                signature=str(raw["signature"]),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise AuditError(f"not an audit record ({type(error).__name__})") from error

    def computed_hash(self) -> str:
        """sha256 of the canonical body, as it should be stored in ``hash``."""
        return hashlib.sha256(_canonical(self.body())).hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement that the log held ``seq`` records ending with hash ``head``."""

    seq: int
    head: str
    time: str
    key_id: str
    hash: str = ""
    signature: str = ""

    def body(self) -> dict[str, Any]:
        """The signed content."""
        return {"v": FORMAT_VERSION, "kind": "checkpoint", "seq": self.seq, "head": self.head,
                "time": self.time, "key_id": self.key_id}

    def to_json(self) -> bytes:
        """Serialise the checkpoint as stored."""
        return _canonical({**self.body(), "hash": self.hash, "signature": self.signature})

    @classmethod
    def from_json(cls, data: bytes) -> Checkpoint:
        """Parse a stored checkpoint.

        Raises:
            AuditError: when the bytes are not a checkpoint of this format.
        """
        try:
            raw = json.loads(data)
            return cls(seq=int(raw["seq"]), head=str(raw["head"]), time=str(raw["time"]),
                       key_id=str(raw["key_id"]), hash=str(raw["hash"]),
                       signature=str(raw["signature"]))
        except (ValueError, KeyError, TypeError) as error:
            raise AuditError(f"not an audit checkpoint ({type(error).__name__})") from error

    def computed_hash(self) -> str:
        """sha256 of the canonical body."""
        return hashlib.sha256(_canonical(self.body())).hexdigest()


@dataclass(frozen=True)
class VerificationResult:
    """Outcome of ``AuditLog.verify``.

    Attributes:
        ok: True when every record and checkpoint is intact.
        count: records verified intact (all of them when ``ok``).
        first_broken_seq: sequence number of the first broken (or missing) record.
        reason: why that record is broken.
        head_seq: sequence number of the last record read.
        head_hash: hash of the last record read; keep it to detect a later truncation.
        checkpoints: checkpoints verified.
        key_pinned: True when the public key came from the caller rather than the log.
    """

    ok: bool
    count: int
    first_broken_seq: int | None = None
    reason: str | None = None
    head_seq: int = 0
    head_hash: str = GENESIS
    checkpoints: int = 0
    key_pinned: bool = False


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _entry_name(folder: str, seq: int) -> str:
    return f"{folder}{seq:012d}.json"


def _object_refs(objects: Mapping[str, str | None] | Iterable[Any]) -> tuple[ObjectRef, ...]:
    pairs: list[tuple[Any, Any]]
    if isinstance(objects, Mapping):
        pairs = list(objects.items())
    else:
        pairs = [item if isinstance(item, tuple) else (item, None) for item in objects]
    refs = []
    for position, (key, digest) in enumerate(pairs, start=1):
        if not isinstance(key, str) or not _is_object_key(key):
            raise AuditPrivacyError(f"object #{position} refused: its key must be path-like")
        if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise AuditPrivacyError(f"object #{position} refused: sha256 must be a hex digest")
        refs.append(ObjectRef(key, digest))
    return tuple(refs)


# ---------------------------------------------------------------- signing key


class AuditSigner:
    """The ed25519 key that signs records and checkpoints.

    Args:
        private_key: the signing key.
    """

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls) -> AuditSigner:
        """Draw a new random key (tests, or the first run of a log)."""
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def public_pem(self) -> bytes:
        """The public key as PEM, as published next to the log."""
        return public_key_pem(self.public_key)

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (written only to a 0600 file)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, data: bytes) -> str:
        """Sign ``data`` and return the signature in base64."""
        return base64.b64encode(self._key.sign(data)).decode("ascii")


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short fingerprint of a public key: the first 16 hex digits of its sha256."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    """Encode a public key as SubjectPublicKeyInfo PEM."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    """Parse a PEM public key.

    Raises:
        AuditError: when it is not an ed25519 public key.
    """
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as error:
        raise AuditError("the audit public key is not a PEM public key") from error
    if not isinstance(key, Ed25519PublicKey):
        raise AuditError("the audit public key is not an ed25519 key")
    return key


def load_signer(path: Path | str | None = None) -> AuditSigner:
    """Load the signing key, creating it with mode 0600 when the file does not exist.

    Args:
        path: key file; defaults to ``$OSTEO_AUDIT_KEY_FILE``, then ``.osteo/audit.key``.

    Returns:
        The signer.

    Raises:
        ConfigError: when the file is readable by others or is not an ed25519 private key.
    """
    path = Path(path or os.environ.get(KEY_FILE_ENV) or DEFAULT_KEY_FILE)

    # 1. Create it on first use, atomically, owner-only.
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        signer = AuditSigner.generate()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_signer(path)
        with os.fdopen(fd, "wb") as handle:
            handle.write(signer.private_pem())
        logger.info("created audit signing key %s (key id %s)", path, signer.key_id)
        return signer

    # 2. Refuse a key others can read: whoever reads it can forge the trail.
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"audit signing key {path} is readable by others: chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{path} ({KEY_FILE_ENV}) is not a PEM private key") from error
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} ({KEY_FILE_ENV}) is not an ed25519 private key")
    return AuditSigner(key)


# ---------------------------------------------------------------- storage backends


class AuditBackend(Protocol):
    """Where the entries live: write-once named blobs."""

    def create(self, name: str, data: bytes) -> bool:
        """Write ``name`` only if it does not exist; return False when it already exists."""
        ...

    def read(self, name: str) -> bytes | None:
        """Return the content of ``name``, or None when it does not exist."""
        ...

    def list(self, prefix: str, start_after: str | None = None) -> list[str]:
        """Return the sorted names under ``prefix`` (after ``start_after`` when given)."""
        ...

    def describe(self) -> str:
        """Where the log is, for messages."""
        ...


class LocalBackend:
    """Audit entries as files of a local directory (unit tests, exported logs).

    Files are created exclusively and left read-only, so a record is never overwritten by
    this code.

    Args:
        root: the log's directory.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def create(self, name: str, data: bytes) -> bool:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o440)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def read(self, name: str) -> bytes | None:
        path = self.root / name
        return path.read_bytes() if path.is_file() else None

    def list(self, prefix: str, start_after: str | None = None) -> list[str]:
        folder = self.root / prefix
        if not folder.is_dir():
            return []
        names = sorted(prefix + child.name for child in folder.iterdir() if child.is_file())
        return [name for name in names if start_after is None or name > start_after]

    def describe(self) -> str:
        return str(self.root)


class S3Backend:
    """Audit entries as objects of a bucket, written with ``If-None-Match: *``.

    Args:
        client: a boto3 S3 client of the writing (or reading) role.
        bucket_name: the bucket, normally ``osteo.config.bucket("audit")``.
        prefix: key prefix of the log inside the bucket ("" for the whole bucket).
    """

    def __init__(self, client: Any, bucket_name: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket_name
        self.prefix = prefix

    def create(self, name: str, data: bytes) -> bool:
        key = self.prefix + name
        # A server without conditional writes fails here (NotImplemented) rather than let a
        # record be silently overwritten.
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*",
                                   ContentType="application/json")
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}:
                return False
            raise AuditStorageError(f"cannot write s3://{self.bucket}/{key}: {code}") from error
        return True

    def read(self, name: str) -> bytes | None:
        key = self.prefix + name
        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in {"NoSuchKey", "404"}:
                return None
            raise AuditStorageError(f"cannot read s3://{self.bucket}/{key}: {code}") from error
        return body

    def list(self, prefix: str, start_after: str | None = None) -> list[str]:
        arguments: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        if start_after:
            arguments["StartAfter"] = self.prefix + start_after
        names: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**arguments):
                names.extend(item["Key"][len(self.prefix):] for item in page.get("Contents", []))
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            where = f"s3://{self.bucket}/{self.prefix}"
            raise AuditStorageError(f"cannot list {where}: {code}") from error
        return sorted(names)

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def s3_backend(role: str, prefix: str = "", store: str = "audit") -> S3Backend:
    """Backend on the audit store, acting as ``role``.

    Args:
        role: a role of the access matrix allowed to write (append) or read the store.
        prefix: key prefix of the log inside the bucket.
        store: the store holding the log.

    Raises:
        ConfigError: when the endpoint or the role's keys are not configured.
    """
    from osteo.storage import s3_client

    return S3Backend(s3_client(role), bucket(store), prefix)


def export_log(source: AuditBackend, destination: Path | str) -> int:
    """Copy a log (key, records, checkpoints) into a local directory for offline verification.

    Args:
        source: the log to copy.
        destination: a directory; entries already there are left as they are.

    Returns:
        The number of entries copied.
    """
    target = LocalBackend(destination)
    copied = 0
    names = [PUBLIC_KEY_NAME, *source.list(RECORDS), *source.list(CHECKPOINTS)]
    for name in names:
        data = source.read(name)
        if data is not None and target.create(name, data):
            copied += 1
    logger.info("exported %d audit entries from %s to %s", copied, source.describe(), destination)
    return copied


# ---------------------------------------------------------------- the log


@dataclass
class _Head:
    seq: int = 0
    hash: str = GENESIS
    name: str | None = None


@dataclass
class _Walk:
    """State of a verification pass over the records."""

    public_key: Ed25519PublicKey
    pinned: bool
    hashes: dict[int, str] = field(default_factory=dict)
    head: _Head = field(default_factory=_Head)


class AuditLog:
    """The audit trail: append signed records, checkpoint, verify, and query.

    Args:
        backend: where the entries live (``S3Backend`` or ``LocalBackend``).
        signer: the signing key; None for a read-only log (verify and query only).
        checkpoint_every: write a checkpoint after every this many records.
    """

    def __init__(
        self,
        backend: AuditBackend,
        signer: AuditSigner | None = None,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        self.backend = backend
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self._head: _Head | None = None
        self._key_published = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------ writing

    def append(
        self,
        actor: str,
        role: str,
        action: str,
        objects: Mapping[str, str | None] | Sequence[Any] = (),
        run_id: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        """Append one signed record after the current head.

        Args:
            actor: who acted: a lowercase login or service identity, e.g. ``svc_prepare``.
            role: the role of the access matrix the actor used.
            action: what was done, a lowercase dotted code, e.g. ``vault.read``.
            objects: the objects concerned: a mapping key to sha256 (or None), or a list of
                keys or of ``(key, sha256)`` pairs.
            run_id: the flow run, when the action is part of one.
            details: extra facts, restricted by the privacy rule (module docstring).

        Returns:
            The stored record.

        Raises:
            AuditPrivacyError: when a value could identify a person.
            AuditStorageError: when the store refuses the write.
            AuditError: when the log has no signer, or is signed with another key.
        """
        signer = self._require_signer()

        # 1. Refuse anything that could identify a person, before it goes anywhere.
        _check_identity(actor, role, action, run_id)
        refs = _object_refs(objects)
        safe_details = check_details(details or {})

        # 2. Chain after the head; a lost race (the name exists) re-reads the head and retries.
        with self._lock:
            self._publish_key(signer)
            for _ in range(MAX_APPEND_ATTEMPTS):
                head = self._current_head()
                record = _signed_record(signer, AuditRecord(
                    seq=head.seq + 1, prev=head.hash, time=_now(), actor=actor, role=role,
                    action=action, objects=refs, run_id=run_id, details=safe_details,
                    key_id=signer.key_id,
                ))
                name = _entry_name(RECORDS, record.seq)
                if self.backend.create(name, record.to_json()):
                    self._head = _Head(record.seq, record.hash, name)
                    break
                self._refresh_head()
            else:
                raise AuditStorageError(
                    f"could not append to {self.backend.describe()}: "
                    f"{MAX_APPEND_ATTEMPTS} concurrent writers won the race"
                )

        # 3. Periodic checkpoint, so that cutting off the tail is detectable.
        logger.debug("audit record %d: %s by %s (%s)", record.seq, action, actor, role)
        if record.seq % self.checkpoint_every == 0:
            self.checkpoint()
        return record

    def checkpoint(self) -> Checkpoint | None:
        """Write a signed checkpoint of the current head (call it at the end of every flow).

        Returns:
            The checkpoint, or None when the log is empty.

        Raises:
            AuditError: when the log has no signer.
        """
        signer = self._require_signer()
        with self._lock:
            head = self._refresh_head()
            if head.seq == 0:
                return None
            checkpoint = Checkpoint(seq=head.seq, head=head.hash, time=_now(),
                                    key_id=signer.key_id)
            digest = checkpoint.computed_hash()
            checkpoint = replace(checkpoint, hash=digest,
                                 signature=signer.sign(_CHECKPOINT_DOMAIN + digest.encode()))
            name = _entry_name(CHECKPOINTS, head.seq)
            if not self.backend.create(name, checkpoint.to_json()):
                existing = self.backend.read(name)
                return Checkpoint.from_json(existing) if existing else None
        logger.info("audit checkpoint at record %d, head %s", head.seq, head.hash[:16])
        return checkpoint

    def _require_signer(self) -> AuditSigner:
        if self.signer is None:
            raise AuditError(f"the audit log {self.backend.describe()} is open read-only")
        return self.signer

    def _publish_key(self, signer: AuditSigner) -> None:
        # Limitation: no key rotation. A log is signed by one key for its whole life; a new
        # key needs a new log (another prefix or bucket), verified with its own public key.
        if self._key_published:
            return
        if not self.backend.create(PUBLIC_KEY_NAME, signer.public_pem()):
            published = key_id(load_public_key(self.backend.read(PUBLIC_KEY_NAME) or b""))
            if published != signer.key_id:
                raise AuditError(
                    f"the audit log {self.backend.describe()} is signed with another key "
                    f"(published key id {published}, signing key id {signer.key_id})"
                )
        self._key_published = True

    def _current_head(self) -> _Head:
        return self._head if self._head is not None else self._refresh_head()

    def _refresh_head(self) -> _Head:
        start = self._head.name if self._head is not None else None
        names = [n for n in self.backend.list(RECORDS, start_after=start) if _seq_of(n)]
        if names:
            data = self.backend.read(names[-1])
            if data is None:
                raise AuditStorageError(f"{names[-1]} vanished while reading the head")
            seq = _seq_of(names[-1]) or 0
            self._head = _Head(seq, AuditRecord.from_json(data).computed_hash(), names[-1])
        elif self._head is None:
            self._head = _Head()
        return self._head

    # ------------------------------------------------------------ reading

    def records(self) -> Iterator[AuditRecord]:
        """Yield the stored records in sequence order (not verified: use ``verify``)."""
        # Limitation: one read per record, so verifying or querying a log of 10^5 records
        # on S3 takes minutes; auditors can work on an exported copy (export_log).
        for name in self.backend.list(RECORDS):
            if _seq_of(name) is None:
                continue
            try:
                yield AuditRecord.from_json(self.backend.read(name) or b"")
            except AuditError:
                logger.warning("skipping unreadable audit entry %s; run osteo audit verify", name)

    def who_accessed(self, object_key: str) -> list[AuditRecord]:
        """Every record concerning ``object_key``: who, in which role, did what, and when.

        Args:
            object_key: the object's key exactly as recorded.

        Returns:
            The records, oldest first.
        """
        return [r for r in self.records() if any(o.key == object_key for o in r.objects)]

    def query(
        self,
        object_key: str | None = None,
        actor: str | None = None,
        since: datetime | None = None,
    ) -> list[AuditRecord]:
        """Records matching every filter given, oldest first.

        Args:
            object_key: only records concerning this object.
            actor: only records of this actor.
            since: only records at or after this instant (naive means UTC).
        """
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        selected = []
        for record in self.records():
            if object_key is not None and all(o.key != object_key for o in record.objects):
                continue
            if actor is not None and record.actor != actor:
                continue
            if since is not None and datetime.fromisoformat(record.time) < since:
                continue
            selected.append(record)
        return selected

    # ------------------------------------------------------------ verification

    def verify(
        self,
        expected_head: str | None = None,
        expected_seq: int | None = None,
        public_key: Ed25519PublicKey | bytes | None = None,
    ) -> VerificationResult:
        """Check the whole log: chain, signatures, checkpoints and an optional external head.

        Args:
            expected_head: hash of a record known from outside the log (e.g. the last
                checkpoint seen); detects a truncation after the last stored checkpoint.
            expected_seq: sequence number of ``expected_head``.
            public_key: pinned public key (object or PEM); the published one when omitted.

        Returns:
            The verdict, naming the first broken record and why.

        Raises:
            AuditError: when a pinned key is not an ed25519 public key.
        """
        # 1. The key: pinned by the caller, or as published next to the log.
        if isinstance(public_key, bytes):
            public_key = load_public_key(public_key)
        pinned = public_key is not None
        if public_key is None:
            published = self.backend.read(PUBLIC_KEY_NAME)
            if published is None:
                empty = not self.backend.list(RECORDS)
                return VerificationResult(ok=empty, count=0, first_broken_seq=None if empty else 1,
                                          reason=None if empty else "no published public key")
            public_key = load_public_key(published)
        walk = _Walk(public_key=public_key, pinned=pinned)

        # 2. Records: position, content hash, signature, chain.
        broken = self._verify_records(walk)

        # 3. Checkpoints, then the externally kept head, both against the intact records.
        checkpoints, checkpoint_break = self._verify_checkpoints(walk)
        external_break = _check_expected(walk, expected_head, expected_seq)
        breaks = [b for b in (broken, checkpoint_break, external_break) if b is not None]
        if breaks:
            seq, reason = min(breaks, key=lambda item: item[0])
            return VerificationResult(
                ok=False, count=seq - 1, first_broken_seq=seq, reason=reason,
                head_seq=walk.head.seq, head_hash=walk.head.hash, checkpoints=checkpoints,
                key_pinned=pinned,
            )
        return VerificationResult(ok=True, count=walk.head.seq, head_seq=walk.head.seq,
                                  head_hash=walk.head.hash, checkpoints=checkpoints,
                                  key_pinned=pinned)

    def _verify_records(self, walk: _Walk) -> tuple[int, str] | None:
        expected = 1
        for name in self.backend.list(RECORDS):
            seq = _seq_of(name)
            if seq is None:
                continue
            if seq != expected:
                return expected, f"record {expected} is missing (deleted or renamed)"
            data = self.backend.read(name)
            problem = _record_problem(data, seq, walk)
            if problem:
                return seq, problem
            expected += 1
        return None

    def _verify_checkpoints(self, walk: _Walk) -> tuple[int, tuple[int, str] | None]:
        verified = 0
        for name in self.backend.list(CHECKPOINTS):
            seq = _seq_of(name)
            if seq is None:
                continue
            data = self.backend.read(name) or b""
            try:
                checkpoint = Checkpoint.from_json(data)
            except AuditError:
                return verified, (seq, f"checkpoint {seq} is unreadable")
            problem = _checkpoint_problem(checkpoint, seq, walk)
            if problem:
                return verified, problem
            verified += 1
        return verified, None


def _signed_record(signer: AuditSigner, record: AuditRecord) -> AuditRecord:
    digest = record.computed_hash()
    signature = signer.sign(_RECORD_DOMAIN + digest.encode("ascii"))
    return replace(record, hash=digest, signature=signature)


def _seq_of(name: str) -> int | None:
    match = _ENTRY_NAME.fullmatch(name)
    return int(match.group(2)) if match else None


def _signature_ok(public_key: Ed25519PublicKey, signature: str, message: bytes) -> bool:
    try:
        public_key.verify(base64.b64decode(signature, validate=True), message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _record_problem(data: bytes | None, seq: int, walk: _Walk) -> str | None:
    """Why the record stored under ``seq`` is broken, or None; updates the walk when intact."""
    try:
        record = AuditRecord.from_json(data or b"")
    except AuditError:
        return f"record {seq} is unreadable"
    if record.seq != seq:
        return f"record {seq} holds sequence number {record.seq} (reordered or renamed)"
    digest = record.computed_hash()
    if digest != record.hash:
        return f"record {seq} was altered (its content no longer matches its hash)"
    if not _signature_ok(walk.public_key, record.signature, _RECORD_DOMAIN + digest.encode()):
        return f"record {seq} has an invalid signature (forged or signed with another key)"
    if record.prev != walk.head.hash:
        return f"record {seq} does not chain to record {seq - 1} (inserted, removed or reordered)"
    walk.hashes[seq] = digest
    walk.head = _Head(seq, digest)
    return None


def _checkpoint_problem(checkpoint: Checkpoint, seq: int, walk: _Walk) -> tuple[int, str] | None:
    digest = checkpoint.computed_hash()
    message = _CHECKPOINT_DOMAIN + digest.encode("ascii")
    if checkpoint.seq != seq or digest != checkpoint.hash:
        return seq, f"checkpoint {seq} was altered"
    if not _signature_ok(walk.public_key, checkpoint.signature, message):
        return seq, f"checkpoint {seq} has an invalid signature"
    if seq > walk.head.seq:
        return walk.head.seq + 1, (
            f"the log ends at record {walk.head.seq} but checkpoint {seq} covers records up "
            f"to {seq}: the tail was cut off"
        )
    if seq in walk.hashes and walk.hashes[seq] != checkpoint.head:
        return seq, f"record {seq} differs from the one checkpoint {seq} signed"
    return None


def _check_expected(
    walk: _Walk, expected_head: str | None, expected_seq: int | None
) -> tuple[int, str] | None:
    if expected_seq is None and expected_head is None:
        return None
    if expected_seq is None or expected_head is None:
        raise AuditError("give both the expected head hash and its sequence number")
    if expected_seq > walk.head.seq:
        return walk.head.seq + 1, (
            f"the log ends at record {walk.head.seq} but record {expected_seq} was seen "
            f"before: the tail was cut off"
        )
    if walk.hashes.get(expected_seq) != expected_head:
        return expected_seq, f"record {expected_seq} differs from the externally kept head"
    return None


def open_audit_log(
    role: str,
    signer: AuditSigner | None = None,
    prefix: str = "",
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
) -> AuditLog:
    """Open the audit log of the audit store acting as ``role``.

    Args:
        role: the role used for the store (a writer to append, ``auditor`` to verify).
        signer: the signing key (``load_signer()``); None opens the log read-only.
        prefix: key prefix of the log inside the bucket.
        checkpoint_every: records between automatic checkpoints (params ``audit``).

    Raises:
        ConfigError: when the endpoint or the role's keys are not configured.
    """
    return AuditLog(s3_backend(role, prefix), signer, checkpoint_every)


def open_log(location: str, role: str = "auditor", signer: AuditSigner | None = None) -> AuditLog:
    """Open a log by location: ``s3`` for the audit store, or the directory of an exported log.

    Args:
        location: ``s3`` or a directory path.
        role: role reading (or writing) the audit store when ``location`` is ``s3``.
        signer: signing key, for appending; None opens the log read-only.

    Raises:
        ConfigError: when the location is neither ``s3`` nor an existing directory, or the
            store is not configured.
    """
    if location == "s3":
        return open_audit_log(role, signer)
    if not Path(location).is_dir():
        raise ConfigError(f"audit log '{location}' is neither 's3' nor an existing directory")
    return AuditLog(LocalBackend(location), signer)
