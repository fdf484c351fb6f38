"""S3 plumbing for the steps: URIs, clients, parallel ranged downloads, directory uploads.

Owns boto3 calls and their errors (raised as ``S3Error`` naming the object); knows nothing of
the model cache's layout.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from workflows.steps.manifest import MANIFEST_FILENAME, Manifest, build_manifest, file_sha256

logger = logging.getLogger(__name__)

# Credentials for an S3-compatible server on loopback (moto accepts any).
LOCAL_AWS_CREDENTIALS = {"aws_access_key_id": "strata-local", "aws_secret_access_key": "strata"}
_PIECE_BYTES = 1 << 20
_RANGE_ATTEMPTS = 3


class S3Error(Exception):
    """An S3 request or transfer failed; the message names the object or local file."""


@dataclass(frozen=True, slots=True)
class S3Object:
    path: str  # relative to the prefix, '/'-separated
    key: str
    size: int
    etag: str


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b/")``; the prefix is empty or ends with '/'."""
    if not uri.startswith("s3://"):
        raise S3Error(f"{uri}: not an s3:// URI")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise S3Error(f"{uri}: no bucket name")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def make_s3_client(endpoint_url: str | None = None, *, max_pool_connections: int = 32) -> Any:
    """A boto3 S3 client. With ``endpoint_url`` (a local S3-compatible server) it uses path-style
    addressing, and placeholder credentials when the environment names none."""
    kwargs: dict[str, Any] = {}
    s3_config: dict[str, str] = {}
    if endpoint_url is not None:
        kwargs["endpoint_url"] = endpoint_url
        kwargs["region_name"] = (
            os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        )
        if not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")):
            kwargs |= LOCAL_AWS_CREDENTIALS
        s3_config["addressing_style"] = "path"
    config = botocore.config.Config(
        max_pool_connections=max_pool_connections,
        retries={"mode": "standard", "max_attempts": 5},
        s3=s3_config,
    )
    return boto3.session.Session().client("s3", config=config, **kwargs)


def error_text(exc: botocore.exceptions.ClientError) -> str:
    error = exc.response.get("Error", {})
    return f"{error.get('Code', '?')}: {error.get('Message') or exc}"


class _Cancelled(Exception):
    pass


class RangedDownloader:
    """Fetches objects as byte ranges, by a pool of threads, into preallocated files under
    ``out_dir``; hashes each file once its last range lands and reports it to ``on_file_done``.

    Chunks are queued file by file, so files finish (and can be recorded as complete) in order.
    A range that fails mid-stream is fetched again, up to three times; ``If-Match`` on every
    GET makes an object replaced during the download fail instead of mixing two versions.
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        out_dir: Path,
        *,
        on_bytes: Callable[[int], None],
        on_file_done: Callable[[S3Object, str], None],
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.out_dir = out_dir
        self.on_bytes = on_bytes
        self.on_file_done = on_file_done
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._num_chunks_left: dict[str, int] = {}
        self.sha256_by_path: dict[str, str] = {}

    def run(self, objects: list[S3Object], *, max_workers: int, chunk_bytes: int) -> dict[str, str]:
        """Download ``objects``; returns path -> sha256. Raises ``S3Error``."""
        if chunk_bytes <= 0 or max_workers <= 0:
            raise S3Error("chunk_bytes and max_workers must be positive")
        chunks: list[tuple[S3Object, int, int]] = []
        for obj in objects:
            self._preallocate(obj)
            starts = range(0, obj.size, chunk_bytes)
            self._num_chunks_left[obj.path] = len(starts)
            chunks += [(obj, s, min(s + chunk_bytes, obj.size) - 1) for s in starts]
            if obj.size == 0:
                self._finish_file(obj)
        with ThreadPoolExecutor(max_workers, thread_name_prefix="stage") as pool:
            futures = [pool.submit(self._fetch_chunk, *chunk) for chunk in chunks]
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException:
                self._stop.set()
                for future in futures:
                    future.cancel()
                raise
        return self.sha256_by_path

    def _preallocate(self, obj: S3Object) -> None:
        path = self.out_dir / obj.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # a hard link may share the inode with another copy
        with path.open("wb") as f:
            f.truncate(obj.size)

    def _fetch_chunk(self, obj: S3Object, first: int, last: int) -> None:
        for attempt in range(1, _RANGE_ATTEMPTS + 1):
            try:
                self._fetch_range(obj, first, last)
                break
            except _Cancelled:
                return
            except botocore.exceptions.ClientError as exc:
                raise S3Error(
                    f"s3://{self.bucket}/{obj.key} (bytes {first}-{last}): {error_text(exc)}"
                ) from exc
            except OSError as exc:
                raise S3Error(f"{self.out_dir / obj.path}: {exc}") from exc
            except botocore.exceptions.BotoCoreError as exc:
                where = f"s3://{self.bucket}/{obj.key} (bytes {first}-{last})"
                if attempt == _RANGE_ATTEMPTS:
                    raise S3Error(f"{where}: {exc}") from exc
                logger.warning("retrying %s: %s", where, exc)
        with self._lock:
            self._num_chunks_left[obj.path] -= 1
            done = self._num_chunks_left[obj.path] == 0
        if done:
            self._finish_file(obj)

    def _fetch_range(self, obj: S3Object, first: int, last: int) -> None:
        response = self.client.get_object(
            Bucket=self.bucket, Key=obj.key, Range=f"bytes={first}-{last}", IfMatch=obj.etag
        )
        body = response["Body"]
        offset = first
        fd = os.open(self.out_dir / obj.path, os.O_WRONLY)
        try:
            for piece in body.iter_chunks(_PIECE_BYTES):
                if self._stop.is_set():
                    raise _Cancelled
                os.pwrite(fd, piece, offset)
                offset += len(piece)
                self.on_bytes(len(piece))
        except BaseException:
            self.on_bytes(first - offset)  # the retry fetches the range again
            raise
        finally:
            os.close(fd)
            body.close()
        if offset != last + 1:
            self.on_bytes(first - offset)
            raise botocore.exceptions.IncompleteReadError(
                actual_bytes=offset - first, expected_bytes=last + 1 - first
            )

    def _finish_file(self, obj: S3Object) -> None:
        sha256 = file_sha256(self.out_dir / obj.path)
        self.on_file_done(obj, sha256)
        with self._lock:
            self.sha256_by_path[obj.path] = sha256


def upload_dir(
    local_dir: Path,
    s3_uri: str,
    *,
    endpoint_url: str | None = None,
    s3_client: Any | None = None,
    create_bucket: bool = False,
    max_workers: int = 8,
) -> Manifest:
    """Upload every file of ``local_dir`` under ``s3_uri``, then its ``strata-manifest.json``
    (last, so a published manifest means a complete upload). Returns that manifest."""
    local_dir = Path(local_dir)
    bucket, prefix = parse_s3_uri(s3_uri)
    client = s3_client or make_s3_client(endpoint_url, max_pool_connections=max_workers * 4)
    manifest = build_manifest(local_dir)
    if create_bucket:
        ensure_bucket(client, bucket)
    transfer = TransferConfig(max_concurrency=4)
    try:
        with ThreadPoolExecutor(max_workers, thread_name_prefix="upload") as pool:
            futures = [
                pool.submit(
                    client.upload_file,
                    str(local_dir / e.path),
                    bucket,
                    prefix + e.path,
                    Config=transfer,
                )
                for e in manifest.files
            ]
            for future in as_completed(futures):
                future.result()
        client.put_object(
            Bucket=bucket, Key=prefix + MANIFEST_FILENAME, Body=manifest.to_json().encode()
        )
    except (
        botocore.exceptions.BotoCoreError,
        botocore.exceptions.ClientError,
        boto3.exceptions.S3UploadFailedError,
    ) as exc:
        raise S3Error(f"{s3_uri}: upload failed: {exc}") from exc
    return manifest


def ensure_bucket(client: Any, bucket: str) -> None:
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError:
        client.create_bucket(Bucket=bucket)
