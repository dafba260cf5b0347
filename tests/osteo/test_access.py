"""The MinIO policies in infra/minio are exactly what the access matrix generates."""

from __future__ import annotations

import json
from pathlib import Path

from osteo.access import minio_policy, minio_setup_script, seaweed_identities
from osteo.config import PACKAGE_ROOT, Credentials, load_access_matrix


def test_committed_minio_policies_match_the_access_matrix() -> None:
    matrix = load_access_matrix()
    policies = PACKAGE_ROOT / "infra" / "minio" / "policies"

    for role in matrix["roles"]:
        committed = json.loads((policies / f"{role}.json").read_text())
        assert committed == minio_policy(matrix, role), (
            f"regenerate: osteo access render-minio ({role})"
        )
    assert (PACKAGE_ROOT / "infra" / "minio" / "setup.sh").read_text() == minio_setup_script(matrix)


def test_seaweed_identities_grant_only_the_matrix_cells() -> None:
    matrix = load_access_matrix()
    keys = {role: Credentials(role + "-key", role + "-secret") for role in matrix["roles"]}

    identities = {
        i["name"]: set(i["actions"]) for i in seaweed_identities(matrix, keys)["identities"]
    }

    assert identities["svc_pseudonymise"] == {
        "Read:osteo-identity-vault",
        "List:osteo-identity-vault",
        "Write:osteo-identity-vault",
    }
    assert not any("identity-vault" in a for a in identities["data_scientist"])
    assert all(a.split(":")[0] in {"Read", "List"} for a in identities["auditor"])


def test_readme_shows_the_current_access_matrix() -> None:
    from osteo.access import markdown_table

    readme = (Path(PACKAGE_ROOT) / "README.md").read_text()

    assert markdown_table(load_access_matrix()) in readme
