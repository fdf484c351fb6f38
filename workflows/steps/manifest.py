"""The sha256 manifest of a model directory: what ``stage`` writes and ``verify`` checks.

``strata-manifest.json`` lists every file of a model (relative path, size, sha256) and a digest
of that list, so two copies of the same bytes have the same digest wherever they came from::

    {"format": 1,
     "digest": "sha256:<hex of the canonical file list>",
     "files": [{"path": "config.json", "size": 871, "sha256": "<hex>"}, ...],
     "source": {"uri": "s3://bucket/prefix/", "etags": {"config.json": "\\"<etag>\\""}},
     "published": {"digest": "sha256:...", "files": [...]}}

``source`` (where the bytes were copied from) and ``published`` (the manifest the source prefix
itself carried, when it had one) are optional and outside the digest. Owns the format and file
hashing; never talks to S3.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_FILENAME = "strata-manifest.json"
MANIFEST_FORMAT = 1
_HASH_BLOCK_BYTES = 1 << 20


class ManifestError(ValueError):
    """A manifest file is missing or malformed; the message names the file."""


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    path: str  # relative, '/'-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    files: tuple[ManifestEntry, ...]
    source_uri: str | None = None
    # relative path -> S3 ETag of the object the file was copied from
    source_etags: dict[str, str] = field(default_factory=dict)
    published: Manifest | None = None

    @property
    def digest(self) -> str:
        return files_digest(self.files)

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def by_path(self) -> dict[str, ManifestEntry]:
        return {entry.path: entry for entry in self.files}

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "digest": self.digest,
            "files": [_entry_doc(entry) for entry in self.files],
        }
        if self.source_uri is not None:
            doc["source"] = {
                "uri": self.source_uri,
                "etags": dict(sorted(self.source_etags.items())),
            }
        if self.published is not None:
            doc["published"] = {
                "digest": self.published.digest,
                "files": [_entry_doc(entry) for entry in self.published.files],
            }
        return json.dumps(doc, indent=2) + "\n"


def files_digest(files: tuple[ManifestEntry, ...] | list[ManifestEntry]) -> str:
    """``sha256:`` of the canonical JSON of the file list, sorted by path."""
    canonical = json.dumps(
        [_entry_doc(entry) for entry in sorted(files, key=lambda e: e.path)],
        separators=(",", ":"),
        sort_keys=True,
    )
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _entry_doc(entry: ManifestEntry) -> dict[str, Any]:
    return {"path": entry.path, "size": entry.size, "sha256": entry.sha256}


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def model_files(model_dir: Path) -> list[str]:
    """Relative '/'-paths of the regular files under ``model_dir``, manifest excluded, sorted."""
    paths = []
    for dirpath, _dirnames, filenames in os.walk(model_dir):
        for filename in filenames:
            rel = (Path(dirpath) / filename).relative_to(model_dir).as_posix()
            if rel != MANIFEST_FILENAME:
                paths.append(rel)
    return sorted(paths)


def build_manifest(model_dir: Path) -> Manifest:
    """Hash every file under ``model_dir`` (the manifest itself excluded)."""
    entries = []
    for rel in model_files(model_dir):
        path = model_dir / rel
        entries.append(ManifestEntry(rel, path.stat().st_size, file_sha256(path)))
    return Manifest(files=tuple(entries))


def parse_manifest(text: str, *, source: str = MANIFEST_FILENAME) -> Manifest:
    """Parse a manifest; raises ``ManifestError`` naming ``source`` when it is malformed or its
    recorded digest does not match its file list."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{source}: invalid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        fmt = doc.get("format") if isinstance(doc, dict) else None
        raise ManifestError(f"{source}: not a Strata manifest (format {fmt!r})")
    try:
        files = _parse_entries(doc["files"])
        published = None
        if doc.get("published") is not None:
            published = Manifest(files=_parse_entries(doc["published"]["files"]))
        src = doc.get("source") or {}
        manifest = Manifest(
            files=files,
            source_uri=src.get("uri"),
            source_etags=dict(src.get("etags") or {}),
            published=published,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ManifestError(f"{source}: malformed manifest ({exc!r})") from exc
    if doc.get("digest") != manifest.digest:
        raise ManifestError(
            f"{source}: recorded digest {doc.get('digest')} does not match its file list "
            f"({manifest.digest}); the manifest was edited or truncated"
        )
    return manifest


def _parse_entries(docs: list[dict[str, Any]]) -> tuple[ManifestEntry, ...]:
    entries = tuple(ManifestEntry(str(d["path"]), int(d["size"]), str(d["sha256"])) for d in docs)
    for entry in entries:
        parts = entry.path.split("/")
        if entry.path.startswith("/") or ".." in parts or "" in parts:
            raise ValueError(f"unsafe path {entry.path!r}")
    return entries


def read_manifest(model_dir: Path) -> Manifest:
    path = Path(model_dir) / MANIFEST_FILENAME
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: no manifest (was the directory staged?)") from exc
    return parse_manifest(text, source=str(path))


def write_manifest(model_dir: Path, manifest: Manifest) -> Path:
    path = Path(model_dir) / MANIFEST_FILENAME
    tmp = path.with_name(f".{MANIFEST_FILENAME}.tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, path)
    return path
