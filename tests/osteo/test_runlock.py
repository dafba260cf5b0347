"""The project's run lock: one run at a time in a project, across processes.

POSIX locks never conflict within one process, so every refusal here comes from a holder in
another process: a Python child started with ``subprocess``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from osteo.cli import app
from osteo.config import ConfigError
from osteo.runlock import LOCK_FILE, ProjectBusyError, project_run


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project directory: one holding params.yaml."""
    (tmp_path / "params.yaml").write_text("export: {path: export}\n")
    return tmp_path

HOLDER = """
import sys
from pathlib import Path
from osteo.runlock import project_run
with project_run(Path(sys.argv[1]), "the test holder"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


@contextmanager
def held_elsewhere(root: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the run lock of ``root`` for the block."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        if holder.poll() is None:
            holder.communicate("", timeout=30)


def test_a_second_run_is_refused_naming_the_first(project: Path) -> None:
    with held_elsewhere(project) as holder:
        with pytest.raises(ProjectBusyError) as refused, project_run(project, "osteo prepare"):
            pass
    message = str(refused.value)
    assert "another run is in progress" in message
    assert f"the test holder (process {holder.pid}, since " in message


def test_the_lock_is_free_again_once_its_holder_ends(project: Path) -> None:
    with held_elsewhere(project):
        pass
    with project_run(project, "osteo prepare"):
        assert "osteo prepare (process" in refusal_elsewhere(project)
    assert (project / LOCK_FILE).read_text() == ""


def test_a_killed_holder_leaves_the_project_free(project: Path) -> None:
    with held_elsewhere(project) as holder:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        with project_run(project, "osteo prepare"):
            pass


def test_runs_nest_in_one_process(project: Path) -> None:
    """The training flow runs the preparation flow inside its own run."""
    with project_run(project, "the train-model flow"):
        with project_run(project, "the prepare-dataset flow"):
            pass
        assert "the train-model flow" in refusal_elsewhere(project)


def refusal_elsewhere(root: Path) -> str:
    """What another process is told when it tries to take the lock of ``root`` now.

    Read by another process on purpose: the holder closing any descriptor of the lock file,
    reading it for instance, would release its POSIX lock.
    """
    attempt = subprocess.run([sys.executable, "-c", HOLDER, str(root)], input="",
                             capture_output=True, text=True, timeout=60)
    assert attempt.returncode != 0, attempt.stdout
    assert "ProjectBusyError" in attempt.stderr
    return attempt.stderr


FORKING_HOLDER = """
import os, sys, time
from pathlib import Path
from osteo.runlock import project_run
with project_run(Path(sys.argv[1]), "the test holder"):
    child = os.fork()
    if child == 0:
        time.sleep(600)  # a worker process, still running when its parent is killed
        os._exit(0)
    print(child, flush=True)
    sys.stdin.read()
"""


def test_worker_processes_forked_by_a_killed_run_do_not_keep_its_lock(project: Path) -> None:
    """Ingest forks workers while the lock is held; a run killed mid-way must not leave them
    holding the project."""
    holder = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, str(project)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    worker = int(holder.stdout.readline())
    try:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        with project_run(project, "osteo prepare"):
            pass
    finally:
        os.kill(worker, signal.SIGKILL)
        if holder.stdin is not None:
            holder.stdin.close()


def test_osteo_stage_refuses_a_busy_project_with_one_clear_line(project: Path) -> None:
    with held_elsewhere(project):
        result = CliRunner().invoke(app, ["stage", "ingest", "--project-dir", str(project)])
    assert result.exit_code == 2
    assert "another run is in progress" in result.output
    assert "Traceback" not in result.output
    assert not (project / "work" / "ingest").exists()


def test_a_directory_without_params_yaml_gets_no_lock_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params.yaml not found"):
        with project_run(tmp_path, "osteo prepare"):
            pass
    assert not (tmp_path / "work").exists()
