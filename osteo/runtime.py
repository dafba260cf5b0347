"""The run environment of a command: telemetry off, Prefect logging, and the S3 endpoint.

When no S3 endpoint is configured, ``storage_session`` starts the embedded SeaweedFS server with
its state under ``<project>/.osteo/s3`` (data survives restarts; role keys are drawn anew at each
start) and stops it, by its PID, when the command ends.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ruamel.yaml import YAML

from osteo.seaweed import EmbeddedS3

logger = logging.getLogger(__name__)

RUN_ENVIRONMENT = {
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    # Stage loggers reach the Prefect run logs as well as the console; a stage run by
    # `dvc repro` (`osteo stage NAME`) has no flow run, and its lines go to the console only,
    # without a warning for each.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "osteo,tasks,models,flows",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def prepare_environment() -> None:
    """Turn telemetry off and give Prefect's ephemeral server time to start."""
    for name, value in RUN_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@contextmanager
def storage_session(project_dir: Path) -> Iterator[str]:
    """Yield the S3 endpoint to use, starting the embedded server when none is configured."""
    if os.environ.get("OSTEO_S3_ENDPOINT"):
        yield os.environ["OSTEO_S3_ENDPOINT"]
        return
    server = EmbeddedS3(project_dir / ".osteo" / "s3")
    logger.info("no OSTEO_S3_ENDPOINT configured: starting the embedded SeaweedFS S3 server")
    with server:
        previous = {name: os.environ.get(name) for name in server.environment()}
        os.environ.update(server.environment())
        try:
            yield server.endpoint_url
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def set_param(project_dir: Path, dotted_key: str, value: object) -> bool:
    """Set one value in ``params.yaml``, keeping its comments; returns True when it changed."""
    path = project_dir / "params.yaml"
    yaml = YAML()
    document = yaml.load(path.read_text())
    *parents, leaf = dotted_key.split(".")
    node = document
    for key in parents:
        node = node.setdefault(key, {})
    if node.get(leaf) == value:
        return False
    node[leaf] = value
    with path.open("w") as handle:
        yaml.dump(document, handle)
    return True
