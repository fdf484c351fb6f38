"""G4: S3, shared by every worker of one model version. One object per block,
``<prefix>/<hash>.kv`` = header || payload, through boto3.

boto3 (not s3fs): a block is one whole-object PUT or GET, so a file-system layer adds nothing,
and boto3 is what the workflow steps already use. It reads the endpoint and credentials from
the standard AWS variables (``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_REGION``, EKS
Pod Identity / IRSA), so the same flags work against moto on loopback and Amazon S3. With an
explicit endpoint (S3-compatible servers) requests use path-style addressing.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

import boto3
import botocore.config
import botocore.exceptions
import torch

from serving.kvcache.tier import KVTier, TierIOError, as_host_bytes, block_key, parse_block_key


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes); ValueError naming the URI."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"--kv-s3-uri must look like s3://bucket/prefix, got {uri!r}")
    return parsed.netloc, parsed.path.strip("/")


def make_s3_client(max_pool_connections: int = 32) -> Any:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = botocore.config.Config(
        max_pool_connections=max_pool_connections,
        retries={"mode": "standard", "max_attempts": 3},
        s3={"addressing_style": "path"} if endpoint else {},
    )
    return boto3.session.Session().client("s3", config=config)


class S3Tier(KVTier):
    """Owns one boto3 client (thread-safe) on ``uri``; knows nothing of who wrote what."""

    name = "G4"
    shared = True

    def __init__(self, uri: str, capacity_blocks: int | None = None, client: Any = None) -> None:
        self.uri = uri
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.capacity_blocks = capacity_blocks
        self.client = client or make_s3_client()
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise ValueError(f"KV S3 tier: bucket of {uri} is not reachable: {exc}") from None

    def key(self, block_hash: int) -> str:
        name = block_key(block_hash)
        return f"{self.prefix}/{name}" if self.prefix else name

    def write(self, block_hash: int, header: bytes, payload: torch.Tensor) -> None:
        body = header + memoryview(as_host_bytes(payload).numpy()).tobytes()
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(block_hash), Body=body)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise TierIOError(
                f"cannot write s3://{self.bucket}/{self.key(block_hash)}: {exc}"
            ) from exc

    def read(self, block_hash: int) -> tuple[bytes, torch.Tensor] | None:
        key = self.key(block_hash)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise TierIOError(f"cannot read s3://{self.bucket}/{key}: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise TierIOError(f"cannot read s3://{self.bucket}/{key}: {exc}") from exc
        data = bytearray(body)
        header_len = int.from_bytes(data[6:8], "little") if len(data) >= 8 else len(data)
        header_len = min(header_len, len(data))
        if header_len == len(data):
            return bytes(data), torch.empty(0, dtype=torch.uint8)
        return bytes(data[:header_len]), torch.frombuffer(
            data, dtype=torch.uint8, offset=header_len
        )

    def delete(self, block_hash: int) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(block_hash))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise TierIOError(
                f"cannot delete s3://{self.bucket}/{self.key(block_hash)}: {exc}"
            ) from exc

    def list_hashes(self) -> list[int]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        out: list[int] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    block_hash = parse_block_key(obj["Key"][len(prefix) :])
                    if block_hash is not None:
                        out.append(block_hash)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise TierIOError(f"cannot list {self.uri}: {exc}") from exc
        return out
