"""Identity vault: the one place where a pseudonym can be traced back to a patient.

Control 4.15 (pseudonymise data coming from the historical patient) asks that names be replaced
by random IDs and that the correspondence be kept in a dedicated database. That database is
the ``identity_vault`` store, which only the ``svc_pseudonymise`` service identity (and the
administrator) may reach; on top of the store's access rules, every object is encrypted on the
client, so the store operator sees neither names nor references:

* one entry per patient, keyed ``patients/<HMAC-SHA256(index key, patient_ref)>``, holding
  the pseudonym, patient_ref, first name, last name, birth date, creation time and the
  patient's own random image key. Entries are encrypted one by one (AES-256-GCM, with the
  entry key as associated data, so an entry copied under another key fails to decrypt) and
  kept in 16 segment objects, ``segments/0`` to ``segments/f``, by the first hex digit of
  their key: a list of entry digests and sealed entries, which names and reveals nobody;
* no entry per image: an image's id is ``I`` + the first 16 hex digits of
  ``HMAC-SHA256(patient's image key, sha256 of the image file)``. It is as stable as the
  patient's entry and cannot be computed without it, so deleting a patient's entry (retention,
  erasure) cuts the link from that patient's images to their export files too.

Looking patients up costs one read per segment, whatever the number of patients, and adding
patients one conditional write per segment that changed: a segment is written only if its
ETag is still the one read (``If-Match``, ``If-None-Match: *`` for a new segment). When two
runs race, the second one reads the segment again and takes the first one's pseudonyms instead
of overwriting them. Entry keys are keyed hashes, so a lookup needs no plaintext listing.

The two 32-byte keys (data key and index key) live outside the stores, in a JSON key file named
by ``OSTEO_VAULT_KEY_FILE`` (default ``.osteo/vault.key`` under the project directory). It is
created with mode 0600 when missing, and the vault refuses to open it when other users may read
it. Losing the key file loses the correspondence: back it up like any other secret.
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
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from osteo.config import ConfigError, bucket
from osteo.minimise import check_fields
from osteo.storage import error_code, list_objects, put_conditionally, s3_client

logger = logging.getLogger(__name__)

KEY_FILE_ENV = "OSTEO_VAULT_KEY_FILE"
DEFAULT_KEY_FILE = Path(".osteo") / "vault.key"
VAULT_ROLE = "svc_pseudonymise"
STORE = "identity_vault"
KEY_BYTES = 32
PATIENT_PREFIX = "patients/"
SEGMENT_PREFIX = "segments/"

# Body layout: format tag, 12-byte GCM nonce, ciphertext with its 16-byte tag.
_BODY_TAG = b"OSV1"
_NONCE_BYTES = 12
_WORKERS = 8
_WRITE_ATTEMPTS = 5  # reads and conditional writes of one segment before giving up
_SEGMENT_TAG = b"OSVS1\n"
_DIGEST_BYTES = 32
R = TypeVar("R")


class VaultError(RuntimeError):
    """The identity vault cannot be read or written; the message names the object key only."""


@dataclass(frozen=True, repr=False)
class VaultKeys:
    """The vault's secrets: ``data_key`` encrypts bodies, ``index_key`` derives object keys."""

    data_key: bytes
    index_key: bytes

    def __repr__(self) -> str:
        return "VaultKeys(<secret>)"


@dataclass(frozen=True, repr=False)
class PatientIdentity:
    """What identifies one patient; written to the vault only, never printed.

    Attributes:
        patient_ref: the hospital's patient reference.
        first_name: first name from the export's patients.csv.
        last_name: last name from the export's patients.csv.
        birth_date: birth date from the DICOM header (``YYYYMMDD``), or empty when unknown.
    """

    patient_ref: str
    first_name: str
    last_name: str
    birth_date: str = ""

    def __repr__(self) -> str:
        return "PatientIdentity(<identifying>)"


@dataclass(frozen=True)
class Resolution:
    """Result of a batch lookup.

    Attributes:
        ids: pseudonymous id of every requested item (patient_ref or image sha256).
        created: how many ids were new: patients whose entry this call wrote, images of
            those patients.
    """

    ids: dict[str, str]
    created: int


@dataclass(frozen=True)
class VaultEntryInfo:
    """What the retention flow learns of one vault entry; nothing in it identifies a person.

    Attributes:
        key: the entry's key (``patients/`` and a keyed hash; its segment is ``segment_key``).
        kind: ``patient`` (the only kind of entry; image ids derive from it).
        pseudonym: the patient pseudonym the entry maps to.
        created_at: when the entry was created (its ``created_at``).
        size: the sealed (encrypted) entry's size in bytes.
        sha256: sha256 of the sealed entry, for the audit trail.
    """

    key: str
    kind: str
    pseudonym: str
    created_at: datetime
    size: int
    sha256: str

def new_pseudonym() -> str:
    """A random patient pseudonym, ``P`` followed by 16 hex digits."""
    return "P" + secrets.token_hex(8)


def new_image_key() -> str:
    """A random per-patient key from which that patient's image ids are derived (base64)."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def image_id(image_key: str, sha256: str) -> str:
    """The id of an image: ``I`` and 16 hex digits of a keyed hash of its file's sha256.

    Args:
        image_key: the patient's image key, from the patient's vault entry.
        sha256: hex digest of the image file.

    Returns:
        The image id, the same for the same patient and file on every run.
    """
    digest = hmac.new(base64.b64decode(image_key), sha256.lower().encode("ascii"),
                      hashlib.sha256).hexdigest()
    return "I" + digest[:16]


# ---------------------------------------------------------------------------------- key file


def key_file_path(project_dir: Path) -> Path:
    """Where the vault keys are: ``$OSTEO_VAULT_KEY_FILE`` or ``.osteo/vault.key`` of the project.

    Args:
        project_dir: the project directory (holds params.yaml).

    Returns:
        The key file path (it may not exist yet).
    """
    configured = os.environ.get(KEY_FILE_ENV, "").strip()
    return Path(configured) if configured else Path(project_dir) / DEFAULT_KEY_FILE


# Limitation: there is no key rotation; replacing the key file makes every existing entry
# unreadable and every pseudonym new. Rotating would mean re-encrypting each entry under new keys.
def load_or_create_keys(path: Path) -> VaultKeys:
    """Read the vault keys, creating the key file with fresh random keys when it is missing.

    Args:
        path: the key file.

    Returns:
        The data key and the index key.

    Raises:
        ConfigError: when the file is readable by other users or is not a valid key file.
    """
    if not path.exists():
        _create_key_file(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(
            f"vault key file {path} is accessible to other users (mode {mode:o}); "
            f"restrict it with: chmod 600 {path}"
        )
    try:
        document = json.loads(path.read_text())
        keys = VaultKeys(
            data_key=base64.b64decode(document["data_key"], validate=True),
            index_key=base64.b64decode(document["index_key"], validate=True),
        )
    except (ValueError, KeyError, TypeError, binascii.Error) as error:
        raise ConfigError(
            f"vault key file {path} is not valid: expected JSON with base64 'data_key' and "
            f"'index_key' ({type(error).__name__})"
        ) from None
    if len(keys.data_key) != KEY_BYTES or len(keys.index_key) != KEY_BYTES:
        raise ConfigError(f"vault key file {path} is not valid: keys must be {KEY_BYTES} bytes")
    return keys


def _create_key_file(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    document = {
        "data_key": base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode(),
        "index_key": base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode(),
        "created_at": _now(),
    }
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process created it first; use theirs
    with os.fdopen(descriptor, "w") as handle:
        json.dump(document, handle, indent=2)
    logger.info("created vault key file %s (mode 600); back it up with the other secrets", path)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------- vault


class IdentityVault:
    """Client-side encrypted correspondence between pseudonyms and identities.

    Args:
        keys: the vault keys (see ``load_or_create_keys``).
        client: a boto3 S3 client acting as a role allowed to use the vault bucket.
        bucket_name: the vault bucket.
        workers: concurrent S3 requests per batch.
    """

    def __init__(self, keys: VaultKeys, client: Any, bucket_name: str, workers: int = _WORKERS):
        self._aead = AESGCM(keys.data_key)
        self._index_key = keys.index_key
        self._client = client
        self.bucket = bucket_name
        self.workers = workers

    @classmethod
    def open(cls, project_dir: Path, role: str = VAULT_ROLE) -> IdentityVault:
        """Open the vault of a project with its key file and the ``identity_vault`` store.

        Args:
            project_dir: the project directory (for the default key file location).
            role: the S3 role to act as.

        Returns:
            The vault, ready for lookups.

        Raises:
            ConfigError: when the key file or the storage settings are unusable.
        """
        keys = load_or_create_keys(key_file_path(project_dir))
        return cls(keys, s3_client(role), bucket(STORE))

    # ------------------------------------------------------------------ keys

    def patient_key(self, patient_ref: str) -> str:
        """Key of a patient's entry: a keyed hash of the reference, never the reference itself."""
        return PATIENT_PREFIX + self._index(patient_ref)

    @staticmethod
    def segment_key(entry_key: str) -> str:
        """Object key of the segment holding an entry: the entry hash's first hex digit.

        Raises:
            VaultError: when the key is not a vault entry key.
        """
        return SEGMENT_PREFIX + _entry_digest(entry_key).hex()[0]

    def _index(self, value: str) -> str:
        return hmac.new(self._index_key, value.encode("utf-8"), hashlib.sha256).hexdigest()

    # ------------------------------------------------------------------ batch lookups

    def resolve(
        self, patients: Iterable[PatientIdentity] = (), images: Mapping[str, str] | None = None,
    ) -> tuple[Resolution, Resolution]:
        """Pseudonyms of patients and ids of their images, entries created for newcomers.

        Existing entries are read, missing ones are created with a fresh random pseudonym and
        image key: one read per segment, and one conditional write per segment that gained
        entries, a few segments at a time. Image ids are derived from their patient's entry.

        Args:
            patients: identities, one per patient_ref (later duplicates are ignored).
            images: the patient_ref of each image, by sha256 hex digest of its file; each
                patient_ref must be among ``patients``.

        Returns:
            The pseudonym of each patient_ref and the image id of each sha256, each with how
            many were new (images count as new when their patient's entry was created now).

        Raises:
            VaultError: when the store refuses a request or an object fails to decrypt.
            KeyError: when an image names a patient_ref that is not among ``patients``.
        """

        # 1. The entries wanted, by segment.
        jobs = self._patient_jobs(patients)
        by_segment: dict[str, dict[str, tuple[str, dict[str, str]]]] = {}
        for key, job in jobs.items():
            by_segment.setdefault(self.segment_key(key), {})[key] = job

        # 2. Each segment read, completed and written back if it gained entries, concurrently.
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            found = list(pool.map(lambda item: self._complete_segment(*item), by_segment.items()))
        entries = {jobs[key][0]: outcome for outcomes in found for key, outcome in outcomes.items()}

        # 3. Pseudonyms, and image ids from each patient's image key.
        pseudonyms = {ref: entry["pseudonym"] for ref, (entry, _) in entries.items()}
        new_patients = {ref for ref, (_, created) in entries.items() if created}
        image_ids = {sha: image_id(_image_key(entries[ref][0]), sha)
                     for sha, ref in (images or {}).items()}
        new_images = sum(ref in new_patients for ref in (images or {}).values())
        return (Resolution(pseudonyms, len(new_patients)), Resolution(image_ids, new_images))

    def pseudonymise_patients(self, patients: Iterable[PatientIdentity]) -> Resolution:
        """Each patient's pseudonym, created for new patients (see ``resolve``).

        Raises:
            VaultError: when the store refuses a request or an object fails to decrypt.
        """
        return self.resolve(patients=patients)[0]

    def find_patient(self, patient_ref: str) -> dict[str, str] | None:
        """Re-identification: the vault entry of a patient, or None when unknown.

        Args:
            patient_ref: the hospital's patient reference.

        Returns:
            The decrypted entry (pseudonym, patient_ref, names, birth_date, created_at).

        Raises:
            VaultError: when the store refuses the request or the entry fails to decrypt.
        """
        key = self.patient_key(patient_ref)
        sealed = self._read_segment(self.segment_key(key)).entries.get(key)
        return None if sealed is None else self._open(key, sealed)

    def _patient_jobs(
        self, patients: Iterable[PatientIdentity]
    ) -> dict[str, tuple[str, dict[str, str]]]:
        # Limitation: an existing entry is never rewritten, so a name corrected in a later
        # export stays as first recorded in the vault (the pseudonym, the part that matters for
        # the data, is unaffected).
        jobs: dict[str, tuple[str, dict[str, str]]] = {}
        for patient in patients:
            key = self.patient_key(patient.patient_ref)
            jobs.setdefault(key, (patient.patient_ref, {
                "pseudonym": new_pseudonym(), "patient_ref": patient.patient_ref,
                "first_name": patient.first_name, "last_name": patient.last_name,
                "birth_date": patient.birth_date, "image_key": new_image_key(),
            }))
        return jobs

    def _complete_segment(
        self, segment_key: str, jobs: dict[str, tuple[str, dict[str, str]]],
    ) -> dict[str, tuple[dict[str, str], bool]]:
        """Read the entries of one segment, adding the missing ones; entry key -> (entry, new).

        When another run wrote the segment first, its entries win over the ones made here.
        """
        def complete(entries: dict[str, bytes]) -> dict[str, tuple[dict[str, str], bool]]:
            outcomes: dict[str, tuple[dict[str, str], bool]] = {}
            for key, (_, template) in jobs.items():
                if key in entries:
                    outcomes[key] = (self._open(key, entries[key]), False)
                else:
                    entry = template | {"created_at": _now()}
                    entries[key] = self._seal(key, entry)
                    outcomes[key] = (entry, True)
            return outcomes

        return self._update_segment(segment_key, complete)

    def _update_segment(self, key: str, change: Callable[[dict[str, bytes]], R]) -> R:
        """Apply ``change`` to a segment's entries and write them back if it changed them.

        The write succeeds only if nobody wrote the segment since it was read; otherwise the
        segment is read again and ``change`` applied anew, up to ``_WRITE_ATTEMPTS`` times.
        """
        for _ in range(_WRITE_ATTEMPTS):
            segment = self._read_segment(key)
            before = dict(segment.entries)
            result = change(segment.entries)
            if segment.entries == before or self._write_segment(key, segment):
                return result
        raise VaultError(f"cannot write vault object {key}: other runs kept changing it")

    # ------------------------------------------------------------------ storage

    def _read_segment(self, key: str) -> _Segment:
        """A segment's sealed entries and its ETag; an absent segment is empty."""
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            body = response["Body"].read()
        except ClientError as error:
            if error_code(error) in {"NoSuchKey", "404"}:
                return _Segment({}, None)
            raise VaultError(f"cannot read vault object {key}: {error_code(error)}") from None
        except BotoCoreError as error:
            raise VaultError(f"cannot read vault object {key}: {error_code(error)}") from None
        try:
            entries = unpack_segment(body)
        except ValueError:
            raise VaultError(f"vault object {key} is not in the vault's format") from None
        return _Segment(entries, response["ETag"])

    def _write_segment(self, key: str, segment: _Segment) -> bool:
        """Write a segment unless someone wrote it since it was read; False when someone did."""
        condition = {"IfMatch": segment.etag} if segment.etag else {"IfNoneMatch": "*"}
        try:
            return put_conditionally(self._client, self.bucket, key,
                                     pack_segment(segment.entries), **condition)
        except (ClientError, BotoCoreError) as error:
            raise VaultError(f"cannot write vault object {key}: {error_code(error)}") from None

    def _segment_keys(self) -> list[str]:
        try:
            objects = list_objects(self._client, self.bucket, SEGMENT_PREFIX)
            return sorted(item["Key"] for item in objects)
        except (ClientError, BotoCoreError) as error:
            raise VaultError(
                f"cannot list the identity vault {self.bucket}: {error_code(error)}"
            ) from None

    # ------------------------------------------------------------------ encryption

    def _seal(self, key: str, entry: dict[str, str]) -> bytes:
        """Encrypt one entry, bound to its key.

        Raises:
            UndeclaredFieldError: when the entry holds a field ``infra/fields.yaml`` does not
                declare for the identity vault (control 4.22).
        """
        check_fields(STORE, entry, f"identity vault entry {key}")
        nonce = secrets.token_bytes(_NONCE_BYTES)
        plaintext = json.dumps(entry, ensure_ascii=False).encode("utf-8")
        return _BODY_TAG + nonce + self._aead.encrypt(nonce, plaintext, key.encode())

    def _open(self, key: str, sealed: bytes) -> dict[str, str]:
        if not sealed.startswith(_BODY_TAG):
            raise VaultError(f"vault entry {key} is not in the vault's format")
        nonce = sealed[len(_BODY_TAG):len(_BODY_TAG) + _NONCE_BYTES]
        ciphertext = sealed[len(_BODY_TAG) + _NONCE_BYTES:]
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, key.encode())
        except InvalidTag:
            raise VaultError(
                f"vault entry {key} failed authentication: wrong vault key file, or the entry "
                "was altered or moved"
            ) from None
        entry: dict[str, str] = json.loads(plaintext)
        return entry

    # ------------------------------------------------------------------ retention (4.19)

    def entry_infos(self) -> list[VaultEntryInfo]:
        """Every entry of the vault with what the retention flow needs, and nothing identifying.

        Each entry is decrypted for its pseudonym and creation time; the names, patient
        reference and birth date it holds are dropped at once.

        Returns:
            One description per patient entry, sorted by key.

        Raises:
            VaultError: when the store refuses a request or an entry fails to decrypt.
        """
        # Limitation: every vault kept in one bucket shares the 16 segment names. An entry
        # sealed with another key file (a lost or replaced one) fails authentication here, so
        # retention stops until the administrator removes that entry.
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            segments = list(pool.map(self._read_segment, self._segment_keys()))
        infos = [self._entry_info(key, sealed)
                 for segment in segments for key, sealed in segment.entries.items()]
        return sorted(infos, key=lambda info: info.key)

    def delete_entry(self, key: str) -> None:
        """Delete one entry (retention or erasure); deleting a missing entry is not an error.

        Args:
            key: the entry's key, as given by ``entry_infos`` or ``patient_key``.

        Raises:
            VaultError: when the key is not a vault entry key or the store refuses the write.
        """
        self._update_segment(self.segment_key(key), lambda entries: entries.pop(key, None))

    def _entry_info(self, key: str, sealed: bytes) -> VaultEntryInfo:
        entry = self._open(key, sealed)
        if not entry.get("created_at"):
            raise VaultError(f"vault entry {key} has no creation time")
        return VaultEntryInfo(
            key=key, kind="patient", pseudonym=entry.get("pseudonym", ""),
            created_at=datetime.fromisoformat(entry["created_at"]),
            size=len(sealed), sha256=hashlib.sha256(sealed).hexdigest(),
        )


def pack_segment(entries: Mapping[str, bytes]) -> bytes:
    """The bytes of a segment object: a format tag, then per entry (by key) its 32-byte digest,
    the length of its sealed bytes (4 bytes, big-endian) and the sealed bytes.

    A binary layout rather than text: sealed entries are random bytes, and a text encoding of
    them (base64) would spell short words, names among them, far more often.
    """
    parts = [_SEGMENT_TAG]
    for key, sealed in sorted(entries.items()):
        parts += [_entry_digest(key), len(sealed).to_bytes(4, "big"), sealed]
    return b"".join(parts)


def unpack_segment(body: bytes) -> dict[str, bytes]:
    """The sealed entries of a segment object, by entry key (see ``pack_segment``).

    Raises:
        ValueError: when the bytes are not a segment.
    """
    if not body.startswith(_SEGMENT_TAG):
        raise ValueError("not a vault segment")
    entries, position = {}, len(_SEGMENT_TAG)
    while position < len(body):
        digest = body[position:position + _DIGEST_BYTES]
        length = int.from_bytes(body[position + _DIGEST_BYTES:position + _DIGEST_BYTES + 4], "big")
        position += _DIGEST_BYTES + 4
        sealed = body[position:position + length]
        if len(digest) < _DIGEST_BYTES or len(sealed) < length:
            raise ValueError("truncated vault segment")
        entries[PATIENT_PREFIX + digest.hex()] = sealed
        position += length
    return entries


def _entry_digest(key: str) -> bytes:
    try:
        digest = bytes.fromhex(key.removeprefix(PATIENT_PREFIX))
    except ValueError:
        digest = b""
    if not key.startswith(PATIENT_PREFIX) or len(digest) != _DIGEST_BYTES:
        raise VaultError(f"{key} is not an identity-vault entry key")
    return digest


@dataclass
class _Segment:
    """One segment object: sealed entries by entry key, its ETag (None when absent)."""

    entries: dict[str, bytes]
    etag: str | None


def _image_key(entry: dict[str, str]) -> str:
    """The patient's image key; entries written before image keys existed have none."""
    key = entry.get("image_key")
    if not key:
        raise VaultError("a patient entry of the identity vault has no image key: it was "
                         "written by an older osteo; re-create the vault to pseudonymise again")
    return key


