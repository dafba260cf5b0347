"""Shared fixtures: a real SeaweedFS S3 server for the whole session, and telemetry off."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from osteo.seaweed import EmbeddedS3  # noqa: E402

# Prefect's temporary server logs its own shutdown after pytest has closed the captured
# streams; without this, logging prints a spurious "Logging error" traceback at exit.
logging.raiseExceptions = False


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedS3]:
    """A real SeaweedFS S3 server on 127.0.0.1 with the access matrix's identities."""
    server = EmbeddedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def s3_env(s3_server: EmbeddedS3, monkeypatch: pytest.MonkeyPatch) -> EmbeddedS3:
    """Point osteo's storage settings at the session's S3 server for one test."""
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture()
def project_dir(tmp_path: Path) -> Path:
    """An empty project directory with the repository's params.yaml."""
    root = Path(__file__).resolve().parent.parent
    (tmp_path / "params.yaml").write_text((root / "params.yaml").read_text())
    return tmp_path
