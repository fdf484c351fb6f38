"""API keys: who may call the inference API (``/v1``) and who the control API (``/admin``).

Keys are kept only as sha256 digests, in memory and in the keys file. An inference key never
opens ``/admin`` and an admin credential never calls the models (403 either way). Without any
key configured both APIs are open (a laptop); once inference keys exist and no admin
credential is set, ``/admin`` is closed to everyone.

Keys file (YAML or JSON), re-read when it changes::

    keys:
      - {name: team-a, sha256: <hex>, role: inference, requests_per_minute: 600,
         tokens_per_minute: 200000}
      - {name: ops, sha256: <hex>, role: admin}
    models:        # per-model admission limits (override --max-inflight-requests ...)
      smollm2: {max_inflight_requests: 64, max_queued_prompt_tokens: 65536}

No I/O here except ``load_keys_file``; the watcher lives in ``app.py``'s background tasks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Role = Literal["inference", "admin"]
ANONYMOUS = "anonymous"


def hash_key(key: str) -> str:
    """The stored form of a bearer key: sha256 hex of its UTF-8 bytes."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, description="Label value in metrics.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 hex of the key.")
    role: Role = "inference"
    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(
        None, gt=0, description="Prompt plus max_tokens at admission, settled to the real count."
    )


class ModelLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_inflight_requests: int | None = Field(None, ge=0, description="0: no limit.")
    max_queued_prompt_tokens: int | None = Field(None, ge=0, description="0: no limit.")


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[KeyEntry] = Field(default_factory=list)
    models: dict[str, ModelLimits] = Field(default_factory=dict)

    @field_validator("keys")
    @classmethod
    def _unique(cls, keys: list[KeyEntry]) -> list[KeyEntry]:
        for attr in ("name", "sha256"):
            values = [getattr(k, attr) for k in keys]
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"duplicate key {attr}: {', '.join(dupes)}")
        return keys


class KeysFileError(ValueError):
    """The keys file is unreadable or invalid (the message names the file and the field)."""


def load_keys_file(path: Path) -> KeysFile:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise KeysFileError(f"keys file {path}: {exc}") from exc
    try:
        return KeysFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise KeysFileError(f"keys file {path}: {where}: {first['msg']}") from None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who sent a request: a key's name and rights (``anonymous`` when auth is off)."""

    name: str
    role: Role
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


class AuthError(Exception):
    """Mapped to 401 (``status_code``) or 403 at the edge."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class KeyStore:
    """Digest -> principal, from ``--api-key``, ``--admin-key`` and the keys file."""

    def __init__(
        self,
        api_key: str | None = None,
        admin_key: str | None = None,
        keys_file: KeysFile | None = None,
    ) -> None:
        self._static: dict[str, Principal] = {}
        if api_key:
            self._static[hash_key(api_key)] = Principal("api-key", "inference")
        if admin_key:
            self._static[hash_key(admin_key)] = Principal("admin-key", "admin")
        self._by_digest: dict[str, Principal] = {}
        self.file = KeysFile()
        self.replace_file(keys_file or KeysFile())

    def replace_file(self, keys_file: KeysFile) -> None:
        """Swap in a newly loaded keys file (atomic for readers on the event loop)."""
        by_digest = dict(self._static)
        for entry in keys_file.keys:
            by_digest[entry.sha256] = Principal(
                entry.name, entry.role, entry.requests_per_minute, entry.tokens_per_minute
            )
        self._by_digest = by_digest
        self.file = keys_file

    def count(self, role: Role) -> int:
        return sum(p.role == role for p in self._by_digest.values())

    def authenticate(self, authorization: str | None, *, admin: bool) -> Principal:
        """The principal for an ``Authorization`` header on the inference (``admin=False``)
        or control API; raises ``AuthError`` (401 unknown/missing key, 403 wrong kind)."""
        need: Role = "admin" if admin else "inference"
        if self.count(need) == 0:
            if admin and self.count("inference") > 0:
                raise AuthError(
                    "the admin API is closed: start the frontend with an admin credential "
                    "(--admin-key / STRATA_ADMIN_KEY, or a role: admin entry in --keys-file)",
                    403,
                )
            return Principal(ANONYMOUS, need)
        scheme, _, token = (authorization or "").partition(" ")
        principal = self._by_digest.get(hash_key(token)) if scheme.lower() == "bearer" else None
        if principal is None:
            raise AuthError(
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'.", 401
            )
        if principal.role != need:
            what = "the admin API" if admin else "the inference API"
            raise AuthError(f"key {principal.name!r} ({principal.role}) may not call {what}", 403)
        return principal
