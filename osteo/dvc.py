"""DVC operations the flows need: remote configuration, commit, push, pull and lineage.

DVC is driven through its command line, exactly as a data engineer or reviewer would drive it,
so that what the flows record is what ``dvc dag``, ``dvc status -c`` and ``dvc params diff``
show. The remote is the training store; its endpoint and the keys of the acting role are written
to ``.dvc/config.local`` (never committed) from the storage settings.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from configobj import ConfigObj

from osteo.config import bucket
from osteo.storage import dvc_remote_settings

logger = logging.getLogger(__name__)

REMOTE_NAME = "training"


class DvcError(RuntimeError):
    """A DVC command failed; the message carries DVC's own explanation."""


def dvc_executable() -> str:
    """The ``dvc`` command of the running environment."""
    beside_python = Path(sys.executable).parent / "dvc"
    return str(beside_python) if beside_python.exists() else (shutil.which("dvc") or "dvc")


def run_dvc(project_dir: Path, *args: str) -> str:
    """Run one DVC command in ``project_dir`` and return its standard output.

    Raises:
        DvcError: when the command exits non-zero.
    """
    # Stage commands (`osteo stage ...`) must resolve to this environment's osteo.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = os.environ | {"DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1", "PATH": path}
    completed = subprocess.run(  # noqa: S603 - fixed executable, arguments from the code
        [dvc_executable(), *args], cwd=project_dir, env=env, capture_output=True, text=True,
        check=False,
    )
    if completed.returncode != 0:
        message = (completed.stderr or completed.stdout).strip().splitlines()
        raise DvcError(f"dvc {' '.join(args[:2])} failed: {' '.join(message[-3:])}")
    return completed.stdout


def init_project(project_dir: Path) -> None:
    """Make ``project_dir`` a git and DVC repository with analytics off (idempotent)."""
    if not (project_dir / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=project_dir, check=True)  # noqa: S603,S607
    if not (project_dir / ".dvc").exists():
        run_dvc(project_dir, "init", "-q")
    run_dvc(project_dir, "config", "core.analytics", "false")
    run_dvc(project_dir, "config", "core.autostage", "false")


def configure_remote(project_dir: Path, role: str = "svc_prepare") -> str:
    """Point the DVC remote at the training store, acting as ``role``.

    The remote's name and URL go to ``.dvc/config``; the endpoint and keys go to
    ``.dvc/config.local``, which DVC keeps out of git.

    Returns:
        The remote URL.
    """
    return _configure(project_dir, REMOTE_NAME, f"s3://{bucket('training')}/dvc", role,
                      default=True)


def _configure(project_dir: Path, name: str, url: str, role: str, default: bool = False) -> str:
    """Declare a remote in ``.dvc/config`` and write its endpoint and keys to config.local.

    The keys are written to the file directly (owner-only), never passed on a command line
    where other local users could read them in the process list.
    """
    config = project_dir / ".dvc" / "config"
    if f'remote "{name}"' not in (config.read_text() if config.exists() else ""):
        run_dvc(project_dir, "remote", "add", *(["--default"] if default else []), name, url)
    local_path = project_dir / ".dvc" / "config.local"
    local = ConfigObj(str(local_path) if local_path.exists() else None, encoding="utf-8")
    local.filename = str(local_path)
    local[f'remote "{name}"'] = {"url": url, **dvc_remote_settings(role)}
    fd = os.open(local_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        local.write(handle)
    return url


def commit(project_dir: Path, *stages: str) -> None:
    """Record the current outputs, dependencies and params of stages (default: all) in dvc.lock."""
    run_dvc(project_dir, "commit", "--force", "--quiet", *stages)


def push(project_dir: Path, *stages: str) -> str:
    """Push cached outputs (default: all) to their remotes (data: training; model: registry)."""
    return run_dvc(project_dir, "push", *stages).strip()


def pull(project_dir: Path, *targets: str) -> str:
    """Fetch and check out cached outputs (all, or the given targets) from their remotes."""
    return run_dvc(project_dir, "pull", *targets).strip()


def lock(project_dir: Path) -> dict[str, Any]:
    """The parsed ``dvc.lock`` of a project, or an empty lock when nothing was recorded."""
    path = project_dir / "dvc.lock"
    if not path.exists():
        return {"stages": {}}
    with path.open() as handle:
        document: dict[str, Any] = yaml.safe_load(handle) or {"stages": {}}
    return document


def output_hash(project_dir: Path, stage: str, path: str) -> str | None:
    """The content hash DVC recorded for one output of a stage (the dataset version)."""
    for out in lock(project_dir)["stages"].get(stage, {}).get("outs", []):
        if out["path"] == path:
            return str(out.get("md5") or out.get("hash") or "") or None
    return None


MODELS_REMOTE = "models"


def configure_models_remote(project_dir: Path, role: str = "svc_train") -> str:
    """Point the ``models`` remote (model outputs of dvc.yaml) at the registry's bucket."""
    return _configure(project_dir, MODELS_REMOTE, f"s3://{bucket('models')}/dvc", role)
