"""The embedded S3 server enforces keys: a wrong key is refused by the server itself."""

from __future__ import annotations

import boto3
import pytest
from botocore.exceptions import ClientError

from osteo.config import bucket
from osteo.seaweed import EmbeddedS3
from osteo.storage import s3_client


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


def test_data_scientist_cannot_read_the_identity_vault(s3_env: EmbeddedS3) -> None:
    s3_client("svc_pseudonymise").put_object(
        Bucket=bucket("identity_vault"), Key="probe", Body=b"secret"
    )

    with pytest.raises(ClientError) as refused:
        s3_client("data_scientist").get_object(Bucket=bucket("identity_vault"), Key="probe")

    assert refused.value.response["Error"]["Code"] == "AccessDenied"
