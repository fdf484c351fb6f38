"""KV tier fixtures: one moto S3 server on loopback for the module, a bucket per test, and the
AWS variables a worker reads (``AWS_ENDPOINT_URL_S3`` and placeholder credentials)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.workflows.conftest import start_moto, stop_moto


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A moto server and the environment that points boto3 at it (set in this process too)."""
    proc, url = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    env = {
        "AWS_ENDPOINT_URL_S3": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env
    stop_moto(proc)


@pytest.fixture
def kv_bucket(s3_env: dict[str, str]) -> str:
    """A fresh bucket; returns ``s3://bucket/kv`` (the tier's URI)."""
    from serving.kvcache.s3 import make_s3_client

    name = f"kv-{uuid.uuid4().hex[:12]}"
    make_s3_client().create_bucket(Bucket=name)
    return f"s3://{name}/kv"
