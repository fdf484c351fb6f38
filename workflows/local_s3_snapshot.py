"""The S3 snapshot behind ``strata local``: moto's server keeps objects in memory only, so its
buckets and objects are saved to a directory on ``down`` and loaded into a fresh server on ``up``.

Layout::

    index.json                   {"format": 1, "buckets": {bucket: {key: {"sha256", "size",
                                  "etag", "content_type"}}}}
    blobs/<sha256[:2]>/<sha256>  object bytes, stored once per content

Saving is incremental (an object whose ETag and size match the index is not fetched again) and
crash-safe (blobs land under temporary names, the index is replaced last). Only bytes and
content types are kept: no versions, ACLs or user metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from workflows.steps.s3 import make_s3_client

_SNAPSHOT_FORMAT = 1


class SnapshotError(Exception):
    """The snapshot directory is unreadable; the message names the file."""


def snapshot_s3(s3_url: str, snapshot_dir: Path) -> int:
    """Save every bucket and object of the S3 server at ``s3_url`` into ``snapshot_dir``.
    Objects whose ETag and size match the last snapshot are not fetched again. Returns the
    number of bytes fetched."""
    snapshot_dir = Path(snapshot_dir)
    client = make_s3_client(s3_url)
    old = _read_index(snapshot_dir)
    new: dict[str, dict[str, dict[str, Any]]] = {}
    num_bytes = 0
    for bucket in client.list_buckets().get("Buckets", []):
        name = bucket["Name"]
        new[name] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for item in page.get("Contents", []):
                key = item["Key"]
                entry = old.get(name, {}).get(key)
                if not _same_object(entry, item, snapshot_dir):
                    entry = _save_blob(client, name, key, item, snapshot_dir)
                    num_bytes += entry["size"]
                new[name][key] = entry
    _write_index(snapshot_dir, new)
    _drop_unused_blobs(snapshot_dir, new)
    return num_bytes


def restore_s3(s3_url: str, snapshot_dir: Path) -> int:
    """Load ``snapshot_dir`` into the (fresh) S3 server at ``s3_url``; returns the object count."""
    snapshot_dir = Path(snapshot_dir)
    index = _read_index(snapshot_dir)
    if not index:
        return 0
    client = make_s3_client(s3_url)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    num_objects = 0
    for bucket, objects in index.items():
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)
        for key, entry in objects.items():
            extra = {"ContentType": entry["content_type"]} if entry.get("content_type") else {}
            client.upload_file(str(_blob_path(snapshot_dir, entry["sha256"])), bucket, key,
                               ExtraArgs=extra)  # fmt: skip
            entry["etag"] = client.head_object(Bucket=bucket, Key=key)["ETag"]
            num_objects += 1
    _write_index(snapshot_dir, index)  # the new ETags keep the next snapshot incremental
    return num_objects


def _same_object(entry: dict[str, Any] | None, item: dict[str, Any], snapshot_dir: Path) -> bool:
    return (
        entry is not None
        and entry["etag"] == item["ETag"]
        and entry["size"] == item["Size"]
        and _blob_path(snapshot_dir, entry["sha256"]).is_file()
    )


def _save_blob(
    client: Any, bucket: str, key: str, item: dict[str, Any], snapshot_dir: Path
) -> dict[str, Any]:
    response = client.get_object(Bucket=bucket, Key=key, IfMatch=item["ETag"])
    tmp = snapshot_dir / "blobs" / f".tmp-{uuid.uuid4().hex}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as f:
            for piece in response["Body"].iter_chunks(1 << 20):
                digest.update(piece)
                f.write(piece)
        blob = _blob_path(snapshot_dir, digest.hexdigest())
        blob.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, blob)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "sha256": digest.hexdigest(),
        "size": int(item["Size"]),
        "etag": item["ETag"],
        "content_type": response.get("ContentType"),
    }


def _blob_path(snapshot_dir: Path, sha256: str) -> Path:
    return snapshot_dir / "blobs" / sha256[:2] / sha256


def _read_index(snapshot_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    path = snapshot_dir / "index.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise SnapshotError(f"{path}: unreadable S3 snapshot index: {exc}") from exc
    if doc.get("format") != _SNAPSHOT_FORMAT:
        raise SnapshotError(f"{path}: unknown snapshot format {doc.get('format')!r}")
    return dict(doc["buckets"])


def _write_index(snapshot_dir: Path, buckets: dict[str, dict[str, dict[str, Any]]]) -> None:
    path = snapshot_dir / "index.json"
    tmp = path.with_name(".index.json.tmp")
    tmp.write_text(json.dumps({"format": _SNAPSHOT_FORMAT, "buckets": buckets}, indent=1))
    os.replace(tmp, path)


def _drop_unused_blobs(snapshot_dir: Path, buckets: dict[str, dict[str, dict[str, Any]]]) -> None:
    used = {entry["sha256"] for objects in buckets.values() for entry in objects.values()}
    for blob in (snapshot_dir / "blobs").glob("*/*"):
        if blob.name not in used:
            blob.unlink()
