"""The performance profile ``strata profile`` writes and the planner and the mock engine read.

One JSON file per (model, engine, device, engine limits)::

    {
      "format": "strata-profile/1",
      "engine": "mock", "model": "smollm2-135m-instruct", "device": "cpu", "source": "engine",
      "block_size": 16, "num_blocks": 8192, "kv_capacity_tokens": 131072,
      "max_num_seqs": 64, "max_num_batched_tokens": 2048, "max_model_len": 32768,
      "prefill": [[tokens, ms], ...],          # one prefill step computing `tokens` tokens
      "decode_grid": {"batch_sizes": [1, 2, ...], "context_tokens": [128, ...],
                      "ms": [[...], ...]}      # one decode step: batch x mean context
    }

``prefill`` and ``decode_grid`` are exactly what ``serving.engine.timing.TimingProfile`` reads
(``--timing-profile``), so a mock worker replays a measured engine. The rest tells the planner
the limits under which the numbers hold (a step computes at most ``max_num_batched_tokens``; a
replica holds ``kv_capacity_tokens`` of KV and runs ``max_num_seqs`` sequences).

Owns the file format and lookups on it; never measures (``profiler.py``, ``profile_http.py``).
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.engine.timing import TimingProfile

PROFILE_FORMAT = "strata-profile/1"


class ProfileError(ValueError):
    """A profile file is missing, unreadable or invalid; the message names the file and field."""


class DecodeGridModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_sizes: list[int] = Field(min_length=1)
    context_tokens: list[int] = Field(min_length=1)
    ms: list[list[float]] = Field(description="Step time, one row per batch size.")

    @model_validator(mode="after")
    def _shape(self) -> DecodeGridModel:
        for name, axis in (
            ("batch_sizes", self.batch_sizes),
            ("context_tokens", self.context_tokens),
        ):
            if any(a >= b for a, b in itertools.pairwise(axis)) or axis[0] < 1:
                raise ValueError(f"{name} must be positive and increasing")
        if len(self.ms) != len(self.batch_sizes) or any(
            len(row) != len(self.context_tokens) for row in self.ms
        ):
            raise ValueError("ms must have one row per batch size and one column per context")
        if any(v <= 0 for row in self.ms for v in row):
            raise ValueError("ms values must be > 0")
        return self


class PerfProfile(BaseModel):
    """A measured profile; ``extra="forbid"`` so that a misspelt key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["strata-profile/1"] = PROFILE_FORMAT
    engine: str = Field(description="builtin | mock | the endpoint's engine (http)")
    model: str
    device: str = "unknown"
    source: Literal["engine", "http"] = "engine"
    created: str = ""
    block_size: int | None = Field(default=None, ge=1)
    num_blocks: int | None = Field(default=None, ge=1)
    kv_capacity_tokens: int | None = Field(
        default=None, ge=1, description="KV one replica holds; None if unknown (http)."
    )
    max_num_seqs: int = Field(ge=1)
    max_num_batched_tokens: int | None = Field(
        default=None, ge=1, description="Tokens one step computes at most; None if unknown."
    )
    max_model_len: int | None = Field(default=None, ge=2)
    prefill: list[tuple[int, float]] = Field(min_length=1)
    decode_grid: DecodeGridModel
    notes: dict[str, str | float | int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> PerfProfile:
        tokens = [t for t, _ in self.prefill]
        if any(a >= b for a, b in itertools.pairwise(tokens)) or tokens[0] < 1:
            raise ValueError("prefill points must have positive, increasing token counts")
        if any(ms <= 0 for _, ms in self.prefill):
            raise ValueError("prefill times must be > 0")
        return self

    # -- lookups (milliseconds in the file, seconds out) ----------------------------------------

    def timing(self) -> TimingProfile:
        """The mock engine's view of this profile."""
        return TimingProfile.from_dict(self.model_dump(mode="json"))

    def prefill_step_s(self, num_tokens: float) -> float:
        """One step computing ``num_tokens`` prompt tokens (interpolated, linear beyond the
        last point so that a longer step never looks free)."""
        if num_tokens <= 0:
            return 0.0
        (x0, y0), (x1, y1) = self.prefill[-2:] if len(self.prefill) > 1 else (self.prefill[0],) * 2
        if num_tokens > x1 and x1 > x0:
            return (y1 + (num_tokens - x1) * (y1 - y0) / (x1 - x0)) / 1000.0
        return self._timing.prefill_ms(int(num_tokens)) / 1000.0

    def prompt_prefill_s(self, input_tokens: float) -> float:
        """Compute time of one whole prompt, in chunks of ``max_num_batched_tokens``."""
        chunk = self.max_num_batched_tokens
        if chunk is None or input_tokens <= chunk:
            return self.prefill_step_s(input_tokens)
        full, rest = divmod(input_tokens, chunk)
        return full * self.prefill_step_s(chunk) + self.prefill_step_s(rest)

    def decode_step_s(self, batch_size: float, context_tokens: float) -> float:
        grid = self._timing.decode_grid
        assert grid is not None
        return grid.step_ms(batch_size, context_tokens) / 1000.0

    @property
    def _timing(self) -> TimingProfile:
        cached = self.__dict__.get("_timing_cache")
        if cached is None:
            cached = self.timing()
            self.__dict__["_timing_cache"] = cached
        return cached

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write atomically (a temporary file renamed over ``path``): never half a profile."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.model_dump(mode="json")
        # One top-level key per line, each value on one line: diffable, still short.
        text = "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in data.items())
        text += "\n}\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_profile(path: Path) -> PerfProfile:
    """Read and validate a profile; ``ProfileError`` names the file and the bad field."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ProfileError(f"profile {path} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ProfileError(f"profile {path}: format is {found!r}, expected {PROFILE_FORMAT!r}")
    try:
        return PerfProfile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ProfileError(f"profile {path}: {where}: {first['msg']}") from exc
