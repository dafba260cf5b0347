"""Patient-file store: the identifiable files kept for legal disputes, encrypted on the client.

When a patient is diagnosed, the diagnostic system records a patient file (name, birth date,
consultation date, what the model proposed and what the radiologist decided). The ENISA scenario
keeps these files in a store of their own, apart from the training data, for consultation in a
legal dispute (section 2.8). This module implements that store for controls 4.10 (one profile,
the administrator, reads it; the radiologist only appends), 4.16 (every write, read and deletion
is an audit record when an audit log is given), 4.19 (retention period, 20 years by default)
and 4.22 (a file only holds the fields ``infra/fields.yaml`` declares for ``patient_files``).

Reads and writes the ``patient_files`` store, one object per file::

    files/<HMAC-SHA256(index key, patient_ref)[:32]>/<YYYY-MM>_<random>.enc

* Bodies are AES-256-GCM (random 96-bit nonce, prepended), with the object key as associated
  data: a body copied under another key fails to decrypt.
* The object key and its metadata (``created-month``) hold the month the file was stored,
  nothing finer, so the retention flow can find expired files by listing, without reading or
  decrypting anything; the keyed hash lets the administrator find one patient's files.
* The key file lives outside the stores: ``$OSTEO_PATIENT_FILES_KEY_FILE``, default
  ``.osteo/patient-files.key``, 32 random bytes (base64), created with mode 0600 when missing.
  The data key and the index key are derived from it with HKDF-SHA256. Losing it loses every
  patient file: back it up with the other secrets.

Error messages name object keys only, never a value of a patient file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from osteo.audit import AuditLog
from osteo.config import ConfigError, bucket
from osteo.minimise import check_fields
from osteo.storage import error_code, list_objects

logger = logging.getLogger(__name__)

STORE = "patient_files"
KEY_FILE_ENV = "OSTEO_PATIENT_FILES_KEY_FILE"
DEFAULT_KEY_FILE = Path(".osteo") / "patient-files.key"
DEFAULT_RETENTION_YEARS = 20      # control 4.19: patient files, kept for legal disputes
FILES_PREFIX = "files/"
CREATED_METADATA = "created-month"
KEY_BYTES = 32
NONCE_BYTES = 12
_ASSOCIATED_DATA = b"osteo.patient-file.v1:"


class PatientFileError(Exception):
    """A patient file cannot be stored or read; the message names the object key only."""


@dataclass(frozen=True, repr=False)
class PatientFileKeys:
    """The secrets of the store: ``data_key`` encrypts bodies, ``index_key`` names patients."""

    data_key: bytes
    index_key: bytes

    @classmethod
    def derive(cls, master: bytes) -> PatientFileKeys:
        """Derive both keys from the key file's 32 bytes (HKDF-SHA256, one label each)."""
        return cls(_hkdf(master, b"osteo patient files: data"),
                   _hkdf(master, b"osteo patient files: index"))

    def __repr__(self) -> str:
        return "PatientFileKeys(<secret>)"


def _hkdf(master: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=label).derive(master)


# ---------------------------------------------------------------- key file


def key_file_path() -> Path:
    """The key file: ``$OSTEO_PATIENT_FILES_KEY_FILE``, else ``.osteo/patient-files.key``."""
    return Path(os.environ.get(KEY_FILE_ENV) or DEFAULT_KEY_FILE)


def load_or_create_key(path: Path | str | None = None) -> PatientFileKeys:
    """Read the store's key, creating the key file with a fresh random key when it is missing.

    Args:
        path: the key file; defaults to ``key_file_path()``.

    Returns:
        The derived data and index keys.

    Raises:
        ConfigError: when the file is readable by other users or does not hold a 32-byte key.
    """
    path = Path(path) if path else key_file_path()

    # 1. Create it on first use, atomically, owner-only.
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_or_create_key(path)
        with os.fdopen(fd, "w") as handle:
            handle.write(base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode() + "\n")
        logger.info("created patient-file key %s (mode 600); back it up with the other secrets",
                    path)

    # 2. Refuse a key others can read: whoever reads it can read every patient file.
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"patient-file key {path} is readable by others: chmod 600 {path}")
    try:
        master = base64.b64decode(path.read_text().strip(), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ConfigError(f"{path} ({KEY_FILE_ENV}) is not a base64 key") from error
    if len(master) != KEY_BYTES:
        raise ConfigError(f"{path} ({KEY_FILE_ENV}) must hold {KEY_BYTES} bytes")
    return PatientFileKeys.derive(master)


# ---------------------------------------------------------------- the store


class PatientFileStore:
    """Encrypted patient files in the ``patient_files`` store.

    Args:
        keys: the store's keys (``load_or_create_key``).
        client: a boto3 S3 client of the acting role (radiologist to append, administrator to
            read).
        bucket_name: the store's bucket.
        audit: when given, every write, read and deletion appends an audit record.
        actor: who acts, as recorded in the audit log (a login or service identity).
        role: the role of the access matrix the client acts as.
    """

    def __init__(
        self, keys: PatientFileKeys, client: Any, bucket_name: str,
        audit: AuditLog | None = None, actor: str = "", role: str = "",
    ) -> None:
        self._aead = AESGCM(keys.data_key)
        self._index_key = keys.index_key
        self._client = client
        self.bucket = bucket_name
        self._audit, self._actor, self._role = audit, actor or role, role

    @classmethod
    def open(
        cls, role: str, key_file: Path | str | None = None, audit: AuditLog | None = None,
        actor: str | None = None,
    ) -> PatientFileStore:
        """The store of the configured S3 endpoint, acting as ``role``.

        Raises:
            ConfigError: when the key file, the endpoint or the role's keys are unusable.
        """
        from osteo.storage import s3_client

        return cls(load_or_create_key(key_file), s3_client(role), bucket(STORE), audit,
                   actor or role, role)

    def patient_prefix(self, patient_ref: str) -> str:
        """The key prefix of one patient's files (a keyed hash: the listing reveals no one)."""
        digest = hmac.new(self._index_key, patient_ref.encode(), hashlib.sha256).hexdigest()
        return f"{FILES_PREFIX}{digest[:32]}/"

    def put(self, record: Mapping[str, Any], created: date | None = None) -> str:
        """Encrypt and store one patient file; an existing file is never replaced.

        Args:
            record: the file's fields (``patient_ref`` required); only the fields declared for
                the ``patient_files`` store are accepted.
            created: the day it is stored (default today, UTC); only its month is kept.

        Returns:
            The object key of the new file.

        Raises:
            UndeclaredFieldError: when the record holds an undeclared field.
            PatientFileError: when ``patient_ref`` is missing or the store refuses the write.
        """
        # 1. Minimisation and the one field the layout needs.
        check_fields(STORE, record, "patient file record")
        patient_ref = record.get("patient_ref")
        if not isinstance(patient_ref, str) or not patient_ref.strip():
            raise PatientFileError("a patient file needs a non-empty patient_ref")

        # 2. Name, encrypt (key as associated data), and write only if the name is new.
        month = (created or datetime.now(UTC).date()).strftime("%Y-%m")
        # "_", not "-": month, "-" and random hex digits could spell a date ("2025-06-12").
        key = f"{self.patient_prefix(patient_ref)}{month}_{secrets.token_hex(16)}.enc"
        body = self._encrypt(key, record)
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*",
                                    Metadata={CREATED_METADATA: month},
                                    ContentType="application/octet-stream")
        except (ClientError, BotoCoreError) as error:
            raise PatientFileError(
                f"cannot write patient file {key}: {error_code(error)}"
            ) from None

        # 3. Trace it.
        self._trace("patient_file.write", [key])
        return key

    def get(self, key: str) -> dict[str, Any]:
        """Read and decrypt one patient file (the read is an audit record when audit is on).

        Raises:
            PatientFileError: when the store refuses the read or the body fails authentication.
        """
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except (ClientError, BotoCoreError) as error:
            raise PatientFileError(f"cannot read patient file {key}: {error_code(error)}") from None
        record = self._decrypt(key, body)
        self._trace("patient_file.read", [key])
        return record

    def find(self, patient_ref: str) -> list[str]:
        """The keys of one patient's files, oldest month first.

        Raises:
            PatientFileError: when the store refuses the listing.
        """
        return list_files(self._client, self.bucket, self.patient_prefix(patient_ref))

    def _encrypt(self, key: str, record: Mapping[str, Any]) -> bytes:
        plaintext = json.dumps(dict(record), sort_keys=True, ensure_ascii=False,
                               default=_iso_date).encode()
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, _ASSOCIATED_DATA + key.encode())

    def _decrypt(self, key: str, body: bytes) -> dict[str, Any]:
        nonce, ciphertext = body[:NONCE_BYTES], body[NONCE_BYTES:]
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, _ASSOCIATED_DATA + key.encode())
        except InvalidTag:
            raise PatientFileError(
                f"patient file {key} failed authentication: wrong key, or altered or moved"
            ) from None
        record: dict[str, Any] = json.loads(plaintext)
        return record

    def _trace(self, action: str, keys: list[str]) -> None:
        if self._audit is not None:
            self._audit.append(self._actor, self._role, action,
                               [f"{self.bucket}/{key}" for key in keys])


# ---------------------------------------------------------------- retention (control 4.19)


def list_files(client: Any, bucket_name: str, prefix: str = FILES_PREFIX) -> list[str]:
    """Every patient-file key under ``prefix``, sorted by month then name.

    Raises:
        PatientFileError: when the store refuses the listing.
    """
    keys: list[str] = []
    try:
        keys.extend(item["Key"] for item in list_objects(client, bucket_name, prefix))
    except (ClientError, BotoCoreError) as error:
        raise PatientFileError(
            f"cannot list s3://{bucket_name}/{prefix}: {error_code(error)}"
        ) from None
    return sorted(keys, key=lambda k: (created_month(k), k))


def created_month(key: str) -> str:
    """The month (``YYYY-MM``) a patient file was stored, read from its key.

    Raises:
        PatientFileError: when the key is not a patient-file key.
    """
    name = key.rsplit("/", 1)[-1]
    month = name[:7]
    try:
        datetime.strptime(month, "%Y-%m")
    except ValueError:
        raise PatientFileError(f"{key} is not a patient-file key") from None
    return month


def is_expired(key: str, retention_years: int, today: date) -> bool:
    """True once the retention period has passed for every day of the file's month.

    A file stored in June 2005 with 20 years of retention expires on 1 July 2025: counting
    from the end of the month never deletes a file early.
    """
    year, month = (int(part) for part in created_month(key).split("-"))
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return today >= date(year + retention_years, month, 1)


def expired_files(
    client: Any, bucket_name: str, retention_years: int = DEFAULT_RETENTION_YEARS,
    today: date | None = None,
) -> list[str]:
    """The patient files past their retention period; needs the list permission only.

    Args:
        client: a client of a role allowed to list the store (``svc_retention``).
        bucket_name: the store's bucket.
        retention_years: the retention period.
        today: the reference day (default today, UTC).

    Returns:
        The expired keys.

    Raises:
        PatientFileError: when the store refuses the listing.
    """
    today = today or datetime.now(UTC).date()
    return [key for key in list_files(client, bucket_name)
            if is_expired(key, retention_years, today)]


def delete_files(
    client: Any, bucket_name: str, keys: Iterable[str], audit: AuditLog | None = None,
    actor: str = "svc_retention", role: str = "svc_retention",
) -> int:
    """Delete patient files (the retention flow), each deletion an audit record when given.

    Args:
        client: a client of a role allowed to delete in the store (``svc_retention``).
        bucket_name: the store's bucket.
        keys: the keys to delete.
        audit: the audit log; None records nothing.
        actor: who acts, for the audit record.
        role: the acting role, for the audit record.

    Returns:
        The number of files deleted.

    Raises:
        PatientFileError: when the store refuses a deletion.
    """
    deleted = 0
    for key in keys:
        try:
            client.delete_object(Bucket=bucket_name, Key=key)
        except (ClientError, BotoCoreError) as error:
            raise PatientFileError(
                f"cannot delete patient file {key}: {error_code(error)}"
            ) from None
        if audit is not None:
            audit.append(actor, role, "patient_file.delete", [f"{bucket_name}/{key}"])
        deleted += 1
    logger.info("deleted %d expired patient files from %s", deleted, bucket_name)
    return deleted


def _iso_date(value: object) -> str:
    """Dates and times are stored as ISO 8601 text; any other non-JSON value is refused."""
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"a patient file cannot hold a {type(value).__name__} value")


