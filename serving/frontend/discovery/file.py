"""Discovery from a file that lists workers (YAML or JSON), re-read when it changes::

    workers:
      - url: http://10.0.0.7:8001
        model: smollm2          # optional: else the name the worker reports
        version: "3"            # optional
        role: decode            # optional: prefill | decode | both (else the worker's /health)
        id: decode-a            # optional worker id
        kv_events_endpoint: tcp://10.0.0.7:5557   # optional: else the worker's /health
        replay_endpoint: tcp://10.0.0.7:5558

A bare list of entries (or of URL strings) is accepted too. A file that does not parse keeps
the last good set (the error is logged naming the file and entry); a missing file is an empty
set (every worker it listed leaves).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.frontend.discovery import Publish
from serving.frontend.workers import WorkerSpec

logger = logging.getLogger(__name__)


class WorkerEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(pattern=r"^https?://")
    model: str | None = None
    version: str | None = None
    role: Literal["prefill", "decode", "both"] | None = None
    id: str | None = None
    kv_events_endpoint: str | None = None
    replay_endpoint: str | None = None

    def spec(self) -> WorkerSpec:
        return WorkerSpec(self.url.rstrip("/"), self.kv_events_endpoint, self.replay_endpoint,
                          self.id, self.role, self.model, self.version)  # fmt: skip


class WorkersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workers: list[WorkerEntry] = Field(default_factory=list)


class WorkersFileError(ValueError):
    pass


def parse_workers_file(text: str, path: Path) -> list[WorkerSpec]:
    """The workers a file's text lists; raises ``WorkersFileError`` naming the bad entry."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise WorkersFileError(f"workers file {path}: {exc}") from None
    if data is None:
        data = {}
    if isinstance(data, list):
        data = {"workers": [{"url": e} if isinstance(e, str) else e for e in data]}
    try:
        parsed = WorkersFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise WorkersFileError(f"workers file {path}: {where}: {first['msg']}") from None
    return [entry.spec() for entry in parsed.workers]


class FileSource:
    """Polls the file's modification time and size; publishes its workers on each change."""

    name = "file"

    def __init__(self, path: Path, *, poll_interval_s: float = 1.0) -> None:
        self.path = path
        self.poll_interval_s = poll_interval_s

    async def run(self, publish: Publish) -> None:
        stamp: tuple[int, int] | None = None
        first = True
        while True:
            try:
                stat = self.path.stat()
                current: tuple[int, int] | None = (stat.st_mtime_ns, stat.st_size)
            except FileNotFoundError:
                current = None
            if current != stamp or first:
                stamp = current
                specs = self._read(missing=current is None)
                if specs is not None:
                    await publish(specs)
                    first = False
            await asyncio.sleep(self.poll_interval_s)

    def _read(self, *, missing: bool) -> list[WorkerSpec] | None:
        if missing:
            logger.warning("workers file %s does not exist: no workers from it", self.path)
            return []
        try:
            return parse_workers_file(self.path.read_text(), self.path)
        except (OSError, WorkersFileError) as exc:
            logger.error("keeping the last worker list: %s", exc)
            return None
