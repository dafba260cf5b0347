"""The identity vault: encrypted on the client, keyed by HMAC, readable only by its service role."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from osteo.config import ConfigError, bucket
from osteo.minimise import UndeclaredFieldError
from osteo.seaweed import EmbeddedS3
from osteo.storage import s3_client
from osteo.vault import (
    IdentityVault,
    PatientIdentity,
    VaultError,
    VaultKeys,
    key_file_path,
    load_or_create_keys,
    pack_segment,
    unpack_segment,
)

pytestmark = pytest.mark.s3

ALICE = PatientIdentity("VAULT-REF-7731", "Amélie", "D'Arcy-Núñez", "19480917")
BRUNO = PatientIdentity("VAULT-REF-7732", "Bruno", "Kowalczyk", "19620403")
IMAGE_SHA = "3f" * 32


def open_vault(key_file: Path, role: str = "svc_pseudonymise") -> IdentityVault:
    return IdentityVault(load_or_create_keys(key_file), s3_client(role), bucket("identity_vault"))


def raw_objects(vault: IdentityVault) -> dict[str, bytes]:
    """Every object of the vault bucket as the administrator sees it, without decryption."""
    admin = s3_client("administrator")
    keys = [
        item["Key"]
        for page in admin.get_paginator("list_objects_v2").paginate(Bucket=vault.bucket)
        for item in page.get("Contents", [])
    ]
    return {key: admin.get_object(Bucket=vault.bucket, Key=key)["Body"].read() for key in keys}


# ---------------------------------------------------------------------------------- key file


def test_missing_key_file_is_created_readable_by_owner_only(tmp_path: Path) -> None:
    key_file = tmp_path / "secrets" / "vault.key"

    keys = load_or_create_keys(key_file)

    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(keys.data_key) == 32 and len(keys.index_key) == 32
    assert keys.data_key != keys.index_key
    assert load_or_create_keys(key_file) == keys


def test_world_readable_key_file_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "vault.key"
    load_or_create_keys(key_file)
    key_file.chmod(0o644)

    with pytest.raises(ConfigError) as refused:
        load_or_create_keys(key_file)

    assert str(key_file) in str(refused.value) and "chmod 600" in str(refused.value)


def test_key_file_without_keys_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "vault.key"
    key_file.write_text(json.dumps({"data_key": "c2hvcnQ="}))
    key_file.chmod(0o600)

    with pytest.raises(ConfigError, match="not valid"):
        load_or_create_keys(key_file)


def test_key_file_location_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OSTEO_VAULT_KEY_FILE", raising=False)
    assert key_file_path(tmp_path) == tmp_path / ".osteo" / "vault.key"

    monkeypatch.setenv("OSTEO_VAULT_KEY_FILE", str(tmp_path / "elsewhere.key"))
    assert key_file_path(tmp_path) == tmp_path / "elsewhere.key"


# ---------------------------------------------------------------------------------- lookups


def test_pseudonyms_are_stable_across_vault_instances_and_differ_between_patients(
    s3_env: EmbeddedS3, tmp_path: Path
) -> None:
    key_file = tmp_path / "vault.key"

    first = open_vault(key_file).pseudonymise_patients([ALICE, BRUNO])
    second = open_vault(key_file).pseudonymise_patients([BRUNO, ALICE])

    assert first.created == 2 and second.created == 0
    assert first.ids == second.ids
    assert first.ids[ALICE.patient_ref] != first.ids[BRUNO.patient_ref]
    assert all(re.fullmatch(r"P[0-9a-f]{16}", pseudonym) for pseudonym in first.ids.values())


def test_image_ids_are_stable_per_patient_and_file_digest(
    s3_env: EmbeddedS3, tmp_path: Path
) -> None:
    key_file = tmp_path / "vault.key"
    other_sha = "a1" * 32

    _, first = open_vault(key_file).resolve(
        [ALICE, BRUNO], {IMAGE_SHA: ALICE.patient_ref, other_sha: BRUNO.patient_ref})
    _, second = open_vault(key_file).resolve([ALICE], {IMAGE_SHA: ALICE.patient_ref})

    assert second.ids[IMAGE_SHA] == first.ids[IMAGE_SHA] != first.ids[other_sha]
    assert re.fullmatch(r"I[0-9a-f]{16}", first.ids[IMAGE_SHA])
    assert (first.created, second.created) == (2, 0)


def test_deleting_a_patient_entry_cuts_the_link_to_its_images(
    s3_env: EmbeddedS3, tmp_path: Path
) -> None:
    """Image ids derive from the patient's own key: a re-created entry gives other ids."""
    vault = open_vault(tmp_path / "vault.key")
    _, before = vault.resolve([ALICE], {IMAGE_SHA: ALICE.patient_ref})

    vault.delete_entry(vault.patient_key(ALICE.patient_ref))
    _, after = vault.resolve([ALICE], {IMAGE_SHA: ALICE.patient_ref})

    assert after.ids[IMAGE_SHA] != before.ids[IMAGE_SHA] and after.created == 1


def test_an_image_of_an_unknown_patient_is_a_programming_error(
    s3_env: EmbeddedS3, tmp_path: Path
) -> None:
    with pytest.raises(KeyError):
        open_vault(tmp_path / "vault.key").resolve([ALICE], {IMAGE_SHA: BRUNO.patient_ref})


def test_vault_entry_gives_the_identity_back(s3_env: EmbeddedS3, tmp_path: Path) -> None:
    vault = open_vault(tmp_path / "vault.key")
    pseudonym = vault.pseudonymise_patients([ALICE]).ids[ALICE.patient_ref]

    entry = vault.find_patient(ALICE.patient_ref)

    assert entry is not None
    assert entry["pseudonym"] == pseudonym
    assert (entry["first_name"], entry["last_name"], entry["birth_date"]) == (
        ALICE.first_name, ALICE.last_name, ALICE.birth_date
    )
    assert vault.find_patient("VAULT-REF-NOBODY") is None


def test_another_key_file_cannot_read_the_vault_entries(
    s3_env: EmbeddedS3, tmp_path: Path
) -> None:
    keys = load_or_create_keys(tmp_path / "vault.key")
    vault = IdentityVault(keys, s3_client("svc_pseudonymise"), bucket("identity_vault"))
    vault.pseudonymise_patients([ALICE])
    # Knows where the entry is (same index key) but not how to decrypt it.
    stolen = VaultKeys(data_key=load_or_create_keys(tmp_path / "other.key").data_key,
                       index_key=keys.index_key)
    thief = IdentityVault(stolen, s3_client("svc_pseudonymise"), bucket("identity_vault"))

    with pytest.raises(VaultError, match="failed authentication"):
        thief.find_patient(ALICE.patient_ref)


def test_entry_moved_under_another_key_fails_authentication(
    s3_env: EmbeddedS3, tmp_path: Path
) -> None:
    vault = open_vault(tmp_path / "vault.key")
    vault.pseudonymise_patients([ALICE])
    admin = s3_client("administrator")
    alice, moved = vault.patient_key(ALICE.patient_ref), vault.patient_key("VAULT-REF-MOVED")
    target = segment_entries(vault, moved) | {moved: segment_entries(vault, alice)[alice]}
    admin.put_object(Bucket=vault.bucket, Key=vault.segment_key(moved), Body=pack_segment(target))

    with pytest.raises(VaultError, match="failed authentication"):
        vault.find_patient("VAULT-REF-MOVED")


def segment_entries(vault: IdentityVault, entry_key: str) -> dict[str, bytes]:
    """The sealed entries of the segment that holds an entry key, as stored (none if absent)."""
    admin = s3_client("administrator")
    try:
        response = admin.get_object(Bucket=vault.bucket, Key=vault.segment_key(entry_key))
    except ClientError:
        return {}
    return unpack_segment(response["Body"].read())


def test_two_runs_adding_patients_to_one_segment_keep_both(
    s3_env: EmbeddedS3, tmp_path: Path
) -> None:
    """A run that read a segment before another run wrote it must not overwrite it."""
    key_file = tmp_path / "vault.key"
    first, second = open_vault(key_file), open_vault(key_file)
    patients = [PatientIdentity(f"VAULT-RACE-{n}", "Ann", "Race", "") for n in range(200)]
    segment = first.segment_key(first.patient_key(patients[0].patient_ref))
    same = [p for p in patients if first.segment_key(first.patient_key(p.patient_ref)) == segment]
    assert len(same) >= 2
    stale = second._read_segment(segment)

    ours = first.pseudonymise_patients(same[:1]).ids
    assert not second._write_segment(segment, stale)  # the ETag it read is no longer current
    theirs = second.pseudonymise_patients(same[1:2]).ids

    again = open_vault(key_file).pseudonymise_patients(same[:2])
    assert again.created == 0 and again.ids == ours | theirs


# ---------------------------------------------------------------------------------- privacy


def test_vault_objects_hold_no_name_reference_or_birth_date_in_clear(
    s3_env: EmbeddedS3, tmp_path: Path
) -> None:
    vault = open_vault(tmp_path / "vault.key")
    vault.resolve([ALICE, BRUNO], {IMAGE_SHA: ALICE.patient_ref})
    identifying = [
        value.encode(encoding)
        for patient in (ALICE, BRUNO)
        for value in (patient.patient_ref, patient.first_name, patient.last_name,
                      patient.birth_date, f"{patient.birth_date[:4]}-{patient.birth_date[4:6]}")
        for encoding in ("utf-8", "utf-16-le")
    ]

    objects = raw_objects(vault)

    ours = {vault.segment_key(vault.patient_key(p.patient_ref)) for p in (ALICE, BRUNO)}
    assert ours <= set(objects)
    for key, body in objects.items():
        assert not [value for value in identifying if value in key.encode() or value in body]
        assert IMAGE_SHA.encode() not in body and IMAGE_SHA not in key


def test_an_entry_with_an_undeclared_field_is_not_written(
    s3_env: EmbeddedS3, tmp_path: Path
) -> None:
    """Control 4.22: the vault holds only what infra/fields.yaml declares for it."""
    vault = open_vault(tmp_path / "vault.key")
    key = vault.patient_key(ALICE.patient_ref)

    with pytest.raises(UndeclaredFieldError, match="nickname"):
        vault._seal(key, {"pseudonym": "P0123456789abcdef", "nickname": "Al"})

    assert key not in segment_entries(vault, key)


def test_data_scientist_cannot_read_a_vault_object(s3_env: EmbeddedS3, tmp_path: Path) -> None:
    vault = open_vault(tmp_path / "vault.key")
    vault.pseudonymise_patients([ALICE])
    scientist = s3_client("data_scientist")

    with pytest.raises(ClientError) as refused:
        scientist.get_object(Bucket=vault.bucket,
                             Key=vault.segment_key(vault.patient_key(ALICE.patient_ref)))

    assert refused.value.response["Error"]["Code"] == "AccessDenied"


def test_data_scientist_role_cannot_open_the_vault(s3_env: EmbeddedS3, tmp_path: Path) -> None:
    with pytest.raises(VaultError, match="AccessDenied"):
        open_vault(tmp_path / "vault.key", role="data_scientist").pseudonymise_patients([ALICE])


def test_a_truncated_segment_is_refused_naming_the_object(
    s3_env: EmbeddedS3, tmp_path: Path
) -> None:
    vault = open_vault(tmp_path / "vault.key")
    vault.pseudonymise_patients([ALICE])
    key = vault.patient_key(ALICE.patient_ref)
    body = pack_segment(segment_entries(vault, key))
    assert unpack_segment(body) == segment_entries(vault, key)
    admin = s3_client("administrator")
    admin.put_object(Bucket=vault.bucket, Key=vault.segment_key(key), Body=body[:-5])

    try:
        with pytest.raises(VaultError,
                           match=f"{vault.segment_key(key)} is not in the vault's format"):
            vault.find_patient(ALICE.patient_ref)
    finally:  # the segment is shared with the other tests' vaults on this server
        admin.put_object(Bucket=vault.bucket, Key=vault.segment_key(key), Body=body)
