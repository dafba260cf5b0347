"""The embedded S3 server enforces keys: wrong, unknown or missing keys are refused by the server
itself, its side doors are closed, and the audit store stays append-only across restarts."""

from __future__ import annotations

import stat
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from osteo.config import bucket
from osteo.seaweed import EmbeddedS3
from osteo.storage import s3_client

pytestmark = pytest.mark.s3


def test_role_keys_write_and_read_back(s3_env: EmbeddedS3) -> None:
    client = s3_client("svc_prepare")
    client.put_object(Bucket=bucket("training"), Key="probe/hello.txt", Body=b"hello")

    body = client.get_object(Bucket=bucket("training"), Key="probe/hello.txt")["Body"].read()

    assert body == b"hello"


@pytest.mark.parametrize("secret", ["wrong-secret", ""])
def test_wrong_secret_is_refused_by_the_server(s3_env: EmbeddedS3, secret: str) -> None:
    access_key = s3_env.credentials["svc_prepare"].access_key
    client = boto3.client(
        "s3", endpoint_url=s3_env.endpoint_url, region_name="us-east-1",
        aws_access_key_id=access_key, aws_secret_access_key=secret or "x",
    )

    with pytest.raises(ClientError) as refused:
        client.list_objects_v2(Bucket=bucket("training"))

    assert refused.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "AccessDenied"}


def test_unknown_access_key_is_refused_by_the_server(s3_env: EmbeddedS3) -> None:
    client = boto3.client(
        "s3", endpoint_url=s3_env.endpoint_url, region_name="us-east-1",
        aws_access_key_id="NOTAKEY", aws_secret_access_key="nothing",
    )

    with pytest.raises(ClientError) as refused:
        client.list_objects_v2(Bucket=bucket("training"))

    assert refused.value.response["Error"]["Code"] == "InvalidAccessKeyId"


@pytest.mark.parametrize("call", ["list_buckets", "list", "get", "put"])
def test_unsigned_request_is_refused_by_the_server(s3_env: EmbeddedS3, call: str) -> None:
    s3_client("svc_prepare").put_object(Bucket=bucket("training"), Key="probe/anon", Body=b"x")
    anonymous = boto3.client("s3", endpoint_url=s3_env.endpoint_url, region_name="us-east-1",
                             config=Config(signature_version=UNSIGNED))
    calls = {
        "list_buckets": lambda: anonymous.list_buckets(),
        "list": lambda: anonymous.list_objects_v2(Bucket=bucket("training")),
        "get": lambda: anonymous.get_object(Bucket=bucket("training"), Key="probe/anon"),
        "put": lambda: anonymous.put_object(Bucket=bucket("training"), Key="probe/anon",
                                            Body=b"overwritten"),
    }

    with pytest.raises(ClientError) as refused:
        calls[call]()

    assert refused.value.response["Error"]["Code"] == "AccessDenied"


def test_data_scientist_cannot_read_the_identity_vault(s3_env: EmbeddedS3) -> None:
    s3_client("svc_pseudonymise").put_object(
        Bucket=bucket("identity_vault"), Key="probe", Body=b"secret"
    )

    with pytest.raises(ClientError) as refused:
        s3_client("data_scientist").get_object(Bucket=bucket("identity_vault"), Key="probe")

    assert refused.value.response["Error"]["Code"] == "AccessDenied"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_filer_http_port_refuses_requests_without_a_token(
    s3_env: EmbeddedS3, method: str
) -> None:
    url = f"http://127.0.0.1:{s3_env.ports['filer']}/buckets/{bucket('identity_vault')}/"
    request = urllib.request.Request(  # noqa: S310 - loopback test URL
        url + ("" if method == "GET" else "planted.txt"),
        data=b"x" if method == "POST" else None, method=method,
    )

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)  # noqa: S310 - loopback test URL

    assert refused.value.code == 401


def test_keys_and_the_plain_unix_socket_are_owner_only(s3_server: EmbeddedS3) -> None:
    state = s3_server.state_dir

    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in ("credentials.json", "identities.json", "security.toml"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
    assert (state / "s3.sock").is_socket()


def test_restarted_server_keeps_the_audit_store_append_only(tmp_path: Path) -> None:
    audit = bucket("audit")
    with EmbeddedS3(tmp_path / "s3") as first:
        writer = first.client(first.credentials["svc_prepare"])
        writer.put_object(Bucket=audit, Key="records/000000000001.json", Body=b"one")

    with EmbeddedS3(tmp_path / "s3") as again:
        writer = again.client(again.credentials["svc_prepare"])
        administrator = again.client(again.credentials["administrator"])

        with pytest.raises(ClientError) as refused:
            administrator.delete_object(Bucket=audit, Key="records/000000000001.json")
        body = writer.get_object(Bucket=audit, Key="records/000000000001.json")["Body"].read()
        assert again.bootstrap_credentials is not None
        status = again.client(again.bootstrap_credentials).get_bucket_versioning(Bucket=audit)

    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    assert body == b"one"
    assert status["Status"] == "Enabled"
