"""An end-to-end project: a small synthetic export prepared by the real Prefect flow.

The flow runs once per test session against the real SeaweedFS S3 server and a real DVC remote;
the tests then inspect what it left behind. Images are small and patients few so the whole
preparation takes seconds; the full-size run belongs to the demo and the benchmarks.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from osteo import dvc
from osteo.config import PACKAGE_ROOT
from osteo.runtime import prepare_environment, set_param
from osteo.seaweed import EmbeddedS3

if TYPE_CHECKING:  # the flow imports Prefect, which the fixtures import only when they run
    from flows.prepare import PreparationSummary

SMALL_EXPORT = {
    "generate.patients": 120,
    "generate.image_size": [128, 104],
    "generate.png_fraction": 0.1,
    "preprocess.size": 64,
    "preprocess.shard_size": 32,
    "split.tolerance": 0.15,
}


@dataclass
class PreparedProject:
    """A project directory after one run of the data preparation flow."""

    root: Path
    export: Path
    truth: Path
    log_file: Path
    prefect_home: Path
    summary: PreparationSummary


def new_project(root: Path) -> Path:
    """A fresh DVC project with the repository's pipeline definition and suites."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(PACKAGE_ROOT / name, root / name)
    shutil.copytree(PACKAGE_ROOT / "expectations", root / "expectations")
    dvc.init_project(root)
    return root


@pytest.fixture(scope="session")
def prepared_project(
    s3_server: EmbeddedS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PreparedProject]:
    from flows.prepare import prepare_dataset
    from osteo.config import load_params
    from osteo.logs import configure_logging
    from osteo.synthetic import generate_from_params

    base = tmp_path_factory.mktemp("e2e")
    root = new_project(base / "project")
    export, truth = base / "export", base / "export.truth.csv"
    log_file, prefect_home = base / "logs" / "osteo.log", base / "prefect-home"

    # 1. Point everything at this session's server, logs and Prefect database.
    saved = dict(os.environ)
    os.environ.update(s3_server.environment())
    os.environ["PREFECT_HOME"] = str(prefect_home)
    os.environ["OSTEO_VAULT_KEY_FILE"] = str(base / "keys" / "vault.key")
    os.environ["OSTEO_AUDIT_KEY_FILE"] = str(base / "keys" / "audit.key")
    prepare_environment()
    configure_logging(log_file=log_file, console=False)

    # 2. A small synthetic export, then the real flow.
    for key, value in SMALL_EXPORT.items():
        set_param(root, key, value)
    set_param(root, "export.path", str(export))
    generate_from_params(load_params(root), export, truth_path=truth)
    summary = prepare_dataset(str(root), push=True)

    yield PreparedProject(root, export, truth, log_file, prefect_home, summary)
    os.environ.clear()
    os.environ.update(saved)


ONE_EPOCH = {
    "train.max_epochs": 1,
    "train.freeze_epochs": 0,
    "train.batch_size": 16,
    "train.patience": 1,
    "evaluate.bootstrap": 50,
}


@pytest.fixture(scope="session")
def trained(prepared_project: PreparedProject) -> object:
    """The small project after one run of the training flow (one epoch, no preparation)."""
    from flows.train import train_model

    for key, value in ONE_EPOCH.items():
        set_param(prepared_project.root, key, value)
    set_param(prepared_project.root, "export.truth", str(prepared_project.truth))
    return train_model(str(prepared_project.root), prepare=False, push=True)
