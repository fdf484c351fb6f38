"""What every KV block below the device carries: a header naming the block and the model, and a
checksum of its bytes. Pure functions over bytes; no I/O.

A stored block is ``header || payload``::

    offset  size  field
    0       4     magic b"STKV"
    4       2     format version (1)
    6       2     header length in bytes (payload starts there)
    8       8     block hash (the engine's chained hash, u64)
    16      8     parent block hash (u64; 0 with flag bit 0 clear: no parent)
    24      4     flags (bit 0: has parent)
    28      4     number of token ids n
    32      8     payload length in bytes
    40      16    XXH3-128 checksum of the payload
    56      16    model identity digest (first 16 bytes of sha256 over the identity's fields)
    72      2     identity text length m
    74      m     identity as canonical JSON (manifest digest, layers, KV heads, head size,
                  dtype, block size): readable, and compared field by field
    74+m    4n    token ids, u32 little-endian (the block's own tokens)

All integers little-endian. A block is served only when its header's hash is the one asked
for, its identity equals the reader's (``ForeignBlock`` otherwise: another model or version)
and the payload's checksum matches (``ChecksumMismatch``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import xxhash

MAGIC = b"STKV"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<4sHHQQIIQ16s16sH")
_U64_MASK = (1 << 64) - 1
MANIFEST_FILENAME = "strata-manifest.json"  # written by the stage step (workflows/steps)


class BlockRejected(ValueError):
    """A stored block that must not be served; ``reason`` labels the metric."""

    reason = "header"


class BadHeader(BlockRejected):
    """Not a block header, another format version, or the wrong block hash or length."""

    reason = "header"


class ForeignBlock(BlockRejected):
    """The block was written by a worker of another model (or version, dtype, block size)."""

    reason = "foreign"


class ChecksumMismatch(BlockRejected):
    """The payload's bytes are not the ones that were written."""

    reason = "checksum"


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """Which KV bytes a block can hold: two workers share blocks only when all fields agree."""

    manifest_digest: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int

    def text(self) -> bytes:
        return _identity_text(self)

    def digest(self) -> bytes:
        return _identity_digest(self)

    @classmethod
    def from_text(cls, text: bytes) -> ModelIdentity:
        return _identity_from_text(text)


# Every block of a model carries the same identity: its text and digest are computed once (an
# onboard decodes and checks a header per block, 1,024 for a 16k-token prefix).
@functools.lru_cache(maxsize=64)
def _identity_text(identity: ModelIdentity) -> bytes:
    return json.dumps(asdict(identity), sort_keys=True, separators=(",", ":")).encode()


@functools.lru_cache(maxsize=64)
def _identity_digest(identity: ModelIdentity) -> bytes:
    return hashlib.sha256(_identity_text(identity)).digest()[:16]


@functools.lru_cache(maxsize=64)
def _identity_from_text(text: bytes) -> ModelIdentity:
    """Parsed once per distinct identity: every block of a model carries the same text."""
    try:
        return ModelIdentity(**json.loads(text))
    except (ValueError, TypeError) as exc:
        raise BadHeader(f"unreadable model identity in block header: {exc}") from None


def model_digest(model_dir: Path | None) -> str:
    """The model's identity digest: its staged manifest's, else one over config and weights.

    ``strata-manifest.json`` (written when the model was staged from S3) names every file's
    sha256, so its digest is the model version. A directory without one (a local checkpoint)
    gets ``files:<sha256>`` over ``config.json`` and the names and sizes of its weight files.
    """
    if model_dir is None:
        return "mock"
    model_dir = Path(model_dir)
    try:
        manifest = json.loads((model_dir / MANIFEST_FILENAME).read_text())
        if isinstance(manifest, dict) and isinstance(manifest.get("digest"), str):
            return manifest["digest"]
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    config = model_dir / "config.json"
    h.update(config.read_bytes() if config.is_file() else b"")
    for path in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{path.name}:{path.stat().st_size};".encode())
    return f"files:{h.hexdigest()}"


def checksum(payload: bytes | memoryview) -> bytes:
    """XXH3-128 of the payload (16 bytes); releases the GIL for inputs over 64 KiB."""
    return xxhash.xxh3_128_digest(payload)


@dataclass(frozen=True, slots=True)
class BlockHeader:
    block_hash: int
    parent_hash: int | None
    token_ids: tuple[int, ...]
    payload_bytes: int
    checksum: bytes
    identity: ModelIdentity

    def encode(self) -> bytes:
        ident = self.identity.text()
        has_parent = self.parent_hash is not None
        fixed = _FIXED.pack(
            MAGIC,
            FORMAT_VERSION,
            _FIXED.size + len(ident) + 4 * len(self.token_ids),
            self.block_hash & _U64_MASK,
            (self.parent_hash or 0) & _U64_MASK,
            int(has_parent),
            len(self.token_ids),
            self.payload_bytes,
            self.checksum,
            self.identity.digest(),
            len(ident),
        )
        tokens = struct.pack(f"<{len(self.token_ids)}I", *self.token_ids)
        return fixed + ident + tokens

    @classmethod
    def decode(cls, data: bytes | memoryview) -> BlockHeader:
        """Parse the header at the start of ``data``; ``BadHeader`` if it is not one."""
        if len(data) < _FIXED.size:
            raise BadHeader(f"block is {len(data)} bytes, shorter than a header")
        (magic, version, header_len, block_hash, parent, flags, num_tokens, payload_bytes,
         digest, ident_digest, ident_len) = _FIXED.unpack_from(data)  # fmt: skip
        if magic != MAGIC or version != FORMAT_VERSION:
            raise BadHeader(f"not a Strata KV block (magic {magic!r}, version {version})")
        if header_len != _FIXED.size + ident_len + 4 * num_tokens or len(data) < header_len:
            raise BadHeader(f"block header length {header_len} is inconsistent")
        ident_text = bytes(data[_FIXED.size : _FIXED.size + ident_len])
        identity = ModelIdentity.from_text(ident_text)
        if identity.digest() != ident_digest:
            raise BadHeader("block header's model identity does not match its digest")
        tokens = struct.unpack_from(f"<{num_tokens}I", data, _FIXED.size + ident_len)
        return cls(
            block_hash=block_hash,
            parent_hash=parent if flags & 1 else None,
            token_ids=tokens,
            payload_bytes=payload_bytes,
            checksum=digest,
            identity=identity,
        )

    @property
    def num_bytes(self) -> int:
        return _FIXED.size + len(self.identity.text()) + 4 * len(self.token_ids)


def make_header(
    block_hash: int,
    parent_hash: int | None,
    token_ids: Sequence[int],
    payload: bytes | memoryview,
    identity: ModelIdentity,
) -> BlockHeader:
    """The header of a block about to leave the device: hashes the payload once."""
    return BlockHeader(
        block_hash=block_hash & _U64_MASK,
        parent_hash=parent_hash & _U64_MASK if parent_hash is not None else None,
        token_ids=tuple(token_ids),
        payload_bytes=len(payload),
        checksum=checksum(payload),
        identity=identity,
    )


def check_header(header: BlockHeader, block_hash: int, identity: ModelIdentity) -> None:
    """Raise unless ``header`` names block ``block_hash`` of the reader's model."""
    if header.identity != identity:
        raise ForeignBlock(
            f"block {block_hash & _U64_MASK:016x} was written for another model "
            f"({header.identity.manifest_digest}, {header.identity.dtype}, "
            f"{header.identity.num_layers} layers, block size {header.identity.block_size})"
        )
    if header.block_hash != block_hash & _U64_MASK:
        raise BadHeader(
            f"asked for block {block_hash & _U64_MASK:016x}, "
            f"the header names {header.block_hash:016x}"
        )


def verify_payload(header: BlockHeader, payload: bytes | memoryview) -> None:
    """Raise ``ChecksumMismatch`` unless ``payload`` is the bytes ``header`` was made from."""
    if len(payload) != header.payload_bytes:
        raise ChecksumMismatch(
            f"block {header.block_hash:016x} payload is {len(payload)} bytes, "
            f"expected {header.payload_bytes}"
        )
    if checksum(payload) != header.checksum:
        raise ChecksumMismatch(f"block {header.block_hash:016x} failed its checksum")
