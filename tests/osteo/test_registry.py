"""The model registry on a real S3 server: every version kept, only accepted ones promoted."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore.exceptions import ClientError

from osteo.config import bucket, load_params
from osteo.layout import Layout
from osteo.registry import (
    CHAMPION_KEY,
    PromotionRefused,
    RegistryError,
    VersionNotFound,
    champion,
    code_version,
    download_checkpoint,
    get,
    list_versions,
    promote,
    register,
)
from osteo.seaweed import EmbeddedS3
from osteo.storage import s3_client
from tasks.evaluate import evaluate
from tests.tasks.test_evaluate import evaluation_params, make_predictions, write_predictions

DATA_VERSION = "0f343b0931126a20f133d67c2b018a3b.dir"


def evaluated_project(root: Path, accepted: bool) -> tuple[Layout, dict[str, Any]]:
    """A project with a checkpoint and an evaluation that meets the criteria or misses them."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(
        (Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    write_predictions(root, make_predictions(seed=31, separation=4.0 if accepted else 0.3))
    params = evaluation_params(root, max_sex_gap=0.3)
    result = evaluate.fn(Layout(root), params)
    assert result.accepted is accepted, result.reasons
    checkpoint = root / "data" / "model" / "model.ckpt"
    checkpoint.write_bytes(os.urandom(70_000))
    return Layout(root), params


def at(second: int) -> datetime:
    return datetime(2025, 3, 1, 10, 0, second, tzinfo=UTC)


def champion_alias() -> bytes | None:
    try:
        response = s3_client("auditor").get_object(Bucket=bucket("models"), Key=CHAMPION_KEY)
    except ClientError:
        return None
    body: bytes = response["Body"].read()
    return body


def test_rejected_version_is_registered_but_the_champion_does_not_move(
    s3_env: EmbeddedS3, tmp_path: Path
) -> None:
    good_layout, good_params = evaluated_project(tmp_path / "good", accepted=True)
    bad_layout, bad_params = evaluated_project(tmp_path / "bad", accepted=False)
    good = register(good_layout, good_params, DATA_VERSION, now=at(1))
    promote(good["version"])
    alias_before = champion_alias()

    bad = register(bad_layout, bad_params, DATA_VERSION, now=at(2))
    with pytest.raises(PromotionRefused, match=f"{bad['version']} was rejected") as refused:
        promote(bad["version"])

    assert bad["status"] == "rejected"
    assert bad["reasons"] and "below the minimum" in " ".join(bad["reasons"])
    assert bad["reasons"][0] in str(refused.value)
    assert bad["version"] in list_versions()
    assert get(bad["version"])["status"] == "rejected"
    assert champion() == good["version"]
    assert champion_alias() == alias_before


def test_accepted_version_is_promoted_and_the_alias_remembers_the_previous_one(
    s3_env: EmbeddedS3, tmp_path: Path
) -> None:
    first_layout, params = evaluated_project(tmp_path / "first", accepted=True)
    first = register(first_layout, params, DATA_VERSION, now=at(3))
    promote(first["version"])
    (first_layout.root / "data" / "model" / "model.ckpt").write_bytes(os.urandom(50_000))
    second = register(first_layout, params, DATA_VERSION, now=at(4))

    alias = promote(second["version"])

    assert second["status"] == "accepted" and second["reasons"] == []
    assert champion() == second["version"]
    assert alias["previous"] == first["version"]
    assert json.loads(champion_alias() or b"{}")["version"] == second["version"]


def test_version_holds_checkpoint_metrics_params_card_and_lineage(
    s3_env: EmbeddedS3, tmp_path: Path
) -> None:
    layout, params = evaluated_project(tmp_path / "project", accepted=True)
    checkpoint = layout.root / "data" / "model" / "model.ckpt"

    manifest = register(layout, params, DATA_VERSION, now=at(5))

    client, name = s3_client("auditor"), bucket("models")
    prefix = f"versions/{manifest['version']}/"
    stored = {key: client.get_object(Bucket=name, Key=prefix + key)["Body"].read()
              for key in ("model.ckpt", "metrics.json", "params.yaml", "model_card.md",
                          "manifest.json")}
    checkpoint_sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert manifest["version"] == f"20250301T100005Z-{checkpoint_sha[:8]}"
    assert stored["model.ckpt"] == checkpoint.read_bytes()
    assert manifest["checkpoint_sha256"] == checkpoint_sha
    assert manifest["data_version"] == DATA_VERSION
    assert manifest["code_version"] == "unknown"
    assert manifest["params"] == params == yaml.safe_load(stored["params.yaml"])
    assert manifest["metrics"] == json.loads(stored["metrics.json"])
    assert json.loads(stored["manifest.json"]) == manifest == get(manifest["version"])
    local_card = (layout.root / "reports" / "model_card.md").read_text()
    assert stored["model_card.md"].decode() == local_card
    assert checkpoint_sha in local_card and DATA_VERSION in local_card


def test_version_without_its_manifest_is_invisible_and_cannot_be_promoted(
    s3_env: EmbeddedS3,
) -> None:
    # What an interrupted registration leaves behind: files, no manifest.
    version = "20250301T100006Z-0badc0de"
    s3_client("svc_train").put_object(Bucket=bucket("models"),
                                      Key=f"versions/{version}/model.ckpt", Body=b"partial")
    alias_before = champion_alias()

    with pytest.raises(VersionNotFound):
        promote(version)

    assert version not in list_versions()
    with pytest.raises(VersionNotFound):
        get(version)
    assert champion_alias() == alias_before


def test_same_version_cannot_be_registered_twice(s3_env: EmbeddedS3, tmp_path: Path) -> None:
    layout, params = evaluated_project(tmp_path / "project", accepted=True)
    register(layout, params, DATA_VERSION, now=at(7))

    with pytest.raises(RegistryError, match="already registered"):
        register(layout, params, DATA_VERSION, now=at(7))


def test_register_without_evaluation_is_an_error(s3_env: EmbeddedS3, project_dir: Path) -> None:
    (project_dir / "data" / "model").mkdir(parents=True)
    (project_dir / "data" / "model" / "model.ckpt").write_bytes(b"weights")

    with pytest.raises(RegistryError, match="run the evaluate stage first"):
        register(Layout(project_dir), load_params(project_dir), DATA_VERSION)


def test_downloaded_checkpoint_matches_its_manifest(s3_env: EmbeddedS3, tmp_path: Path) -> None:
    layout, params = evaluated_project(tmp_path / "project", accepted=True)
    manifest = register(layout, params, DATA_VERSION, now=at(8))

    path = download_checkpoint(manifest["version"], tmp_path / "serving" / "model.ckpt",
                               role="auditor")

    assert path.read_bytes() == (layout.root / "data" / "model" / "model.ckpt").read_bytes()


def test_auditor_reads_versions_but_cannot_move_the_champion(
    s3_env: EmbeddedS3, tmp_path: Path
) -> None:
    layout, params = evaluated_project(tmp_path / "project", accepted=True)
    manifest = register(layout, params, DATA_VERSION, now=at(9))
    alias_before = champion_alias()

    with pytest.raises(ClientError) as refused:
        promote(manifest["version"], role="auditor")

    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    assert get(manifest["version"], role="auditor")["status"] == "accepted"
    assert champion_alias() == alias_before


def test_code_version_is_the_git_commit_and_unknown_outside_git(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=osteo", "-c", "user.email=osteo@example.invalid"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    (repo / "params.yaml").write_text("a: 1\n")
    subprocess.run([*git, "add", "params.yaml"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()

    clean = code_version(repo)
    (repo / "params.yaml").write_text("a: 2\n")

    assert clean == head
    assert code_version(repo) == head + "-dirty"
    assert code_version(outside) == "unknown"
