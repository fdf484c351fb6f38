"""``stage``: copy a model from ``s3://bucket/prefix/`` onto the model cache.

Layout in ``cache_dir`` while a model named ``x`` is staged::

    x/                         the published copy (the previous one, if any, until the swap)
    .x.strata-partial/         the download in progress; survives a failure for the next run
    .x.strata-progress.jsonl   one line per file known complete there (path, size, etag, sha256)
    .x.strata-lock             flock: one stage of ``x`` at a time

Invariants: ``x/`` is either the previous complete copy or the new complete copy with its
``strata-manifest.json``, never a mix; a failure (error, Ctrl-C) leaves ``x/`` as it was. A rerun
skips every file that is already complete (in the partial directory or the previous copy) with
the right size and sha256, so it downloads only what is missing.

Owns the cache layout, resume and the directory swap; the ranged GETs live in
``workflows.steps.s3`` and the checks against a published manifest in ``workflows.steps.verify``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from workflows.steps.manifest import (
    MANIFEST_FILENAME,
    Manifest,
    ManifestEntry,
    ManifestError,
    file_sha256,
    parse_manifest,
    read_manifest,
    write_manifest,
)
from workflows.steps.s3 import (
    RangedDownloader,
    S3Error,
    S3Object,
    error_text,
    make_s3_client,
    parse_s3_uri,
)
from workflows.steps.verify import VerifyError, check_published

DEFAULT_MAX_WORKERS = 16
# 64 MiB ranges: fewer GETs per file. Each GET costs a round trip, and a server that copies the
# object to answer a range (moto, the local S3) pays CPU per request in proportion to the
# object's size; bench/stage.py measured 16 MiB ranges at 1.5x boto3's download_file and
# 64 MiB ones at 2.2x there, with the S3 server's CPU time down from 3.2 s to 1.1 s.
DEFAULT_CHUNK_BYTES = 64 << 20
PARTIAL_SUFFIX = ".strata-partial"
PROGRESS_SUFFIX = ".strata-progress.jsonl"


class StageError(Exception):
    """Staging failed; the message names the object or path at fault."""


@dataclass(frozen=True)
class StageResult:
    source_uri: str
    target_dir: Path
    manifest_digest: str
    num_files: int
    total_bytes: int
    downloaded_bytes: int
    skipped_bytes: int  # complete files reused from an earlier run or the previous copy
    num_skipped_files: int
    has_published_manifest: bool
    duration_s: float


def stage(
    source_uri: str,
    cache_dir: Path,
    *,
    s3_endpoint_url: str | None = None,
    max_workers: int = DEFAULT_MAX_WORKERS,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    name: str | None = None,
    s3_client: Any | None = None,
    check: Callable[[Path], object] | None = None,
    show_progress: bool = True,
) -> StageResult:
    """Copy every object under ``source_uri`` into ``cache_dir/<name>`` (``name`` defaults to the
    prefix's last component) and write its ``strata-manifest.json``.

    Each file is fetched as ``chunk_bytes`` byte ranges by ``max_workers`` threads. When the
    prefix holds a ``strata-manifest.json`` (the publisher's), the copy must match it file for
    file, or ``VerifyError`` names the file (and that file is dropped, so a rerun fetches it
    again). ``check``, when given, runs on the complete copy before it is moved into place (the
    workflow passes ``verify``); whatever it raises stops the swap. Raises ``StageError`` for
    S3 and file-system failures.
    """
    started_s = time.monotonic()
    try:
        bucket, prefix = parse_s3_uri(source_uri)
    except S3Error as exc:
        raise StageError(str(exc)) from exc
    name = name or (prefix.rstrip("/").rpartition("/")[2] or bucket)
    cache_dir = Path(cache_dir).expanduser().absolute()
    target_dir = cache_dir / name
    partial_dir = cache_dir / f".{name}{PARTIAL_SUFFIX}"
    client = s3_client or make_s3_client(s3_endpoint_url, max_pool_connections=max_workers + 4)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / f".{name}.strata-lock"):
        objects, published = list_source(client, bucket, prefix)
        if published is not None:
            _check_listing(objects, published, source_uri)
        partial_dir.mkdir(exist_ok=True)
        ledger = _Ledger(cache_dir / f".{name}{PROGRESS_SUFFIX}")
        _remove_strays(partial_dir, {o.path for o in objects})
        reused = _reuse_complete(objects, partial_dir, target_dir, published, ledger)
        to_fetch = [o for o in objects if o.path not in reused]
        with _progress(show_progress, reused, objects) as on_bytes:
            downloader = RangedDownloader(
                client, bucket, partial_dir, on_bytes=on_bytes, on_file_done=ledger.record
            )
            try:
                fetched = downloader.run(to_fetch, max_workers=max_workers, chunk_bytes=chunk_bytes)
            except S3Error as exc:
                raise StageError(str(exc)) from exc
        sha256_by_path = reused | fetched
        manifest = Manifest(
            files=tuple(ManifestEntry(o.path, o.size, sha256_by_path[o.path]) for o in objects),
            source_uri=source_uri,
            source_etags={o.path: o.etag for o in objects},
            published=published,
        )
        _check_published(manifest, partial_dir, ledger)
        write_manifest(partial_dir, manifest)
        if check is not None:
            check(partial_dir)
        _move_into_place(partial_dir, target_dir)
        ledger.path.unlink(missing_ok=True)
    skipped_bytes = sum(o.size for o in objects if o.path in reused)
    return StageResult(
        source_uri=source_uri,
        target_dir=target_dir,
        manifest_digest=manifest.digest,
        num_files=len(objects),
        total_bytes=manifest.total_bytes,
        downloaded_bytes=manifest.total_bytes - skipped_bytes,
        skipped_bytes=skipped_bytes,
        num_skipped_files=len(reused),
        has_published_manifest=published is not None,
        duration_s=time.monotonic() - started_s,
    )


def list_source(client: Any, bucket: str, prefix: str) -> tuple[list[S3Object], Manifest | None]:
    """The model's objects under ``prefix`` (sorted by path) and its published manifest, if any."""
    uri = f"s3://{bucket}/{prefix}"
    objects: list[S3Object] = []
    manifest_key = prefix + MANIFEST_FILENAME
    has_manifest = False
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for item in page.get("Contents", []):
                key = item["Key"]
                if key == manifest_key:
                    has_manifest = True
                elif not key.endswith("/"):  # "directory" markers hold no data
                    rel = _safe_relative(key[len(prefix) :], uri)
                    objects.append(S3Object(rel, key, int(item["Size"]), item["ETag"]))
        published = _read_published(client, bucket, manifest_key) if has_manifest else None
    except botocore.exceptions.ClientError as exc:
        raise StageError(f"{uri}: cannot list the source: {error_text(exc)}") from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise StageError(f"{uri}: cannot reach S3: {exc}") from exc
    if not objects:
        raise StageError(f"{uri}: no objects under this prefix (is the URI right?)")
    return sorted(objects, key=lambda o: o.path), published


def _read_published(client: Any, bucket: str, key: str) -> Manifest:
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        return parse_manifest(body.decode(), source=f"s3://{bucket}/{key}")
    except (ManifestError, UnicodeDecodeError) as exc:
        raise StageError(str(exc)) from exc


def _safe_relative(rel: str, uri: str) -> str:
    parts = rel.split("/")
    if ".." in parts or "" in parts:
        raise StageError(f"{uri}{rel}: object key is not a safe relative path")
    return rel


def _check_listing(objects: list[S3Object], published: Manifest, uri: str) -> None:
    """Fail before any download when names or sizes already disagree with the published list."""
    expected = published.by_path()
    for obj in objects:
        entry = expected.pop(obj.path, None)
        if entry is None:
            raise VerifyError(f"{uri}{obj.path}: not in the source's published manifest", obj.path)
        if entry.size != obj.size:
            raise VerifyError(
                f"{uri}{obj.path}: {obj.size} bytes, the source's published manifest says "
                f"{entry.size}",
                obj.path,
            )
    if expected:
        missing = sorted(expected)[0]
        raise VerifyError(f"{uri}{missing}: in the published manifest but not in S3", missing)


class _Ledger:
    """Append-only record of files known complete in the partial directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.records: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    record = json.loads(line)
                    self.records[str(record["path"])] = record

    def record(self, obj: S3Object, sha256: str) -> None:
        line = json.dumps({"path": obj.path, "size": obj.size, "etag": obj.etag, "sha256": sha256})
        with self._lock, self.path.open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
            self.records[obj.path] = json.loads(line)

    def forget(self, path: str) -> None:
        with self._lock:
            self.records.pop(path, None)
            lines = "".join(json.dumps(r) + "\n" for r in self.records.values())
            self.path.write_text(lines)


def _remove_strays(partial_dir: Path, wanted: set[str]) -> None:
    for dirpath, _dirs, filenames in os.walk(partial_dir):
        for filename in filenames:
            path = Path(dirpath) / filename
            if path.relative_to(partial_dir).as_posix() not in wanted:
                path.unlink()


def _reuse_complete(
    objects: list[S3Object],
    partial_dir: Path,
    target_dir: Path,
    published: Manifest | None,
    ledger: _Ledger,
) -> dict[str, str]:
    """Path -> sha256 of the files already complete in ``partial_dir``, linking in those the
    previous copy at ``target_dir`` already holds.

    A file counts as complete when its size and sha256 match what was recorded when it was
    fetched, and either the source's published sha256 or the object's current ETag agrees.
    """
    published_sha = {e.path: e.sha256 for e in published.files} if published else {}
    previous = _previous_copy(target_dir)
    reused: dict[str, str] = {}
    for obj in objects:
        expected_sha256 = published_sha.get(obj.path)
        record = ledger.records.get(obj.path)
        sha256 = _complete_sha256(partial_dir / obj.path, obj, record, expected_sha256)
        if sha256 is None:
            record = previous.get(obj.path)
            sha256 = _complete_sha256(target_dir / obj.path, obj, record, expected_sha256)
            if sha256 is not None:
                _link_or_copy(target_dir / obj.path, partial_dir / obj.path)
                ledger.record(obj, sha256)
        if sha256 is not None:
            reused[obj.path] = sha256
    return reused


def _previous_copy(target_dir: Path) -> dict[str, dict[str, Any]]:
    """The previous copy's manifest as ledger-style records (empty when there is none)."""
    try:
        manifest = read_manifest(target_dir)
    except (ManifestError, OSError):
        return {}
    return {
        e.path: {"size": e.size, "etag": manifest.source_etags.get(e.path), "sha256": e.sha256}
        for e in manifest.files
    }


def _complete_sha256(
    path: Path, obj: S3Object, record: dict[str, Any] | None, published_sha256: str | None
) -> str | None:
    """The file's sha256 when it is a complete copy of ``obj``, else None."""
    if record is None or record.get("size") != obj.size:
        return None
    if published_sha256 is not None:
        if record.get("sha256") != published_sha256:
            return None
    elif record.get("etag") != obj.etag:
        return None
    try:
        if path.stat().st_size != obj.size or file_sha256(path) != record["sha256"]:
            return None
    except OSError:
        return None
    return str(record["sha256"])


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def _progress(
    enabled: bool, reused: dict[str, str], objects: list[S3Object]
) -> Iterator[Callable[[int], None]]:
    sizes = {o.path: o.size for o in objects}
    skipped_bytes = sum(sizes[p] for p in reused)
    to_fetch_bytes = sum(sizes.values()) - skipped_bytes
    console = Console(stderr=True)
    if enabled and reused:
        console.print(
            f"resuming: {len(reused)} of {len(objects)} files "
            f"({skipped_bytes / 1e6:.1f} MB) already complete"
        )
    if not enabled or to_fetch_bytes == 0:
        yield lambda num_bytes: None
        return
    columns = (
        TextColumn("[bold]stage"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("stage", total=to_fetch_bytes)
        yield lambda num_bytes: progress.advance(task, num_bytes)


def _check_published(manifest: Manifest, partial_dir: Path, ledger: _Ledger) -> None:
    """Compare with the published manifest; a file that differs is dropped, so a rerun (after
    the source is fixed) fetches it again."""
    try:
        check_published(manifest)
    except VerifyError as exc:
        if exc.path is not None:
            ledger.forget(exc.path)
            (partial_dir / exc.path).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with path.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StageError(f"{path}: another stage of this model is running") from exc
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _move_into_place(partial_dir: Path, target_dir: Path) -> None:
    """Rename ``partial_dir`` onto ``target_dir``; the previous copy goes only after it lands."""
    if not target_dir.exists() or (target_dir.is_dir() and not any(target_dir.iterdir())):
        os.replace(partial_dir, target_dir)  # rename(2) replaces an empty directory atomically
        return
    if not target_dir.is_dir():
        raise StageError(f"{target_dir}: exists and is not a directory")
    old_dir = target_dir.with_name(f".{target_dir.name}.{uuid.uuid4().hex[:8]}.strata-old")
    os.rename(target_dir, old_dir)
    try:
        os.rename(partial_dir, target_dir)
    except BaseException:
        os.rename(old_dir, target_dir)
        raise
    shutil.rmtree(old_dir, ignore_errors=True)
