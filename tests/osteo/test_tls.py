"""Secure transit (control 4.8): the TLS server is reached only through TLS verified by its CA."""

from __future__ import annotations

import socket
import ssl
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError, SSLError
from dvc_s3 import S3FileSystem as DvcS3FileSystem

from osteo.config import ConfigError, bucket
from osteo.seaweed import EmbeddedS3
from osteo.storage import dvc_remote_settings, s3_client, s3_filesystem

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedS3]:
    """A second, TLS-only SeaweedFS server for this module."""
    server = EmbeddedS3(tmp_path_factory.mktemp("seaweedfs-tls"), tls=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def tls_env(tls_server: EmbeddedS3, monkeypatch: pytest.MonkeyPatch) -> EmbeddedS3:
    for name, value in tls_server.environment().items():
        monkeypatch.setenv(name, value)
    return tls_server


def test_environment_names_the_https_endpoint_and_its_ca(tls_server: EmbeddedS3) -> None:
    environment = tls_server.environment()

    assert environment["OSTEO_S3_ENDPOINT"].startswith("https://127.0.0.1:")
    assert Path(environment["OSTEO_S3_CA_BUNDLE"]) == tls_server.ca_bundle
    assert environment["OSTEO_S3_REQUIRE_TLS"] == "1"


def test_boto3_client_with_the_ca_bundle_connects(tls_env: EmbeddedS3) -> None:
    client = s3_client("svc_prepare")
    client.put_object(Bucket=bucket("training"), Key="tls/probe.txt", Body=b"over tls")

    body = client.get_object(Bucket=bucket("training"), Key="tls/probe.txt")["Body"].read()

    assert body == b"over tls"


def test_s3fs_filesystem_with_the_ca_bundle_connects(tls_env: EmbeddedS3) -> None:
    filesystem = s3_filesystem("svc_prepare")
    path = f"{bucket('training')}/tls/fsspec.txt"

    filesystem.pipe(path, b"through s3fs")

    assert filesystem.cat(path) == b"through s3fs"


def test_dvc_remote_settings_verify_with_the_ca_bundle(tls_env: EmbeddedS3) -> None:
    settings = dvc_remote_settings("svc_prepare")
    filesystem = DvcS3FileSystem(**settings).fs
    path = f"{bucket('training')}/tls/dvc.txt"

    filesystem.pipe(path, b"through dvc-s3")

    assert settings["ssl_verify"] == str(tls_env.ca_bundle)
    assert filesystem.cat(path) == b"through dvc-s3"


def test_client_without_the_ca_fails_verification(tls_server: EmbeddedS3) -> None:
    keys = tls_server.credentials["svc_prepare"]
    client = boto3.client(
        "s3", endpoint_url=tls_server.endpoint_url, region_name="us-east-1",
        aws_access_key_id=keys.access_key, aws_secret_access_key=keys.secret_key,
        config=Config(retries={"max_attempts": 1}),
    )

    with pytest.raises(SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        client.list_objects_v2(Bucket=bucket("training"))


def test_plain_http_to_the_tls_port_is_refused(tls_server: EmbeddedS3) -> None:
    keys = tls_server.credentials["svc_prepare"]
    client = boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{tls_server.s3_port}", region_name="us-east-1",
        aws_access_key_id=keys.access_key, aws_secret_access_key=keys.secret_key,
        config=Config(retries={"max_attempts": 1}),
    )

    with pytest.raises((ClientError, ConnectionClosedError)):
        client.list_objects_v2(Bucket=bucket("training"))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{tls_server.s3_port}/", timeout=5)  # noqa: S310

    assert refused.value.code == 400
    assert b"HTTP request to an HTTPS server" in refused.value.read()


def test_tls_1_3_is_negotiated_with_a_certificate_for_the_loopback_address(
    tls_server: EmbeddedS3,
) -> None:
    context = ssl.create_default_context(cafile=str(tls_server.ca_bundle))

    with socket.create_connection(("127.0.0.1", tls_server.s3_port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as connection:
            version = connection.version()
            certificate = connection.getpeercert()
    assert certificate is not None
    names = certificate["subjectAltName"]

    assert version == "TLSv1.3"
    assert ("IP Address", "127.0.0.1") in names and ("DNS", "localhost") in names


def test_private_keys_are_owner_only(tls_server: EmbeddedS3) -> None:
    assert tls_server.tls_files is not None

    for key in (tls_server.tls_files.ca_key, tls_server.tls_files.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


@pytest.mark.parametrize("make", [s3_client, s3_filesystem, dvc_remote_settings])
def test_require_tls_refuses_a_plain_http_endpoint(
    tls_env: EmbeddedS3, monkeypatch: pytest.MonkeyPatch, make: object
) -> None:
    monkeypatch.setenv("OSTEO_S3_ENDPOINT", f"http://127.0.0.1:{tls_env.s3_port}")

    with pytest.raises(ConfigError, match="OSTEO_S3_REQUIRE_TLS"):
        make("svc_prepare")  # type: ignore[operator]


def test_missing_ca_bundle_is_one_clear_message(
    tls_env: EmbeddedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OSTEO_S3_CA_BUNDLE", str(tmp_path / "nowhere.pem"))

    with pytest.raises(ConfigError, match="OSTEO_S3_CA_BUNDLE"):
        s3_client("svc_prepare")
