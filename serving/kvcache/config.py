"""KV tier settings of one worker, parsed once from its flags. All tiers are off by default."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.kvcache.s3 import parse_s3_uri
from serving.kvcache.stack import DEFAULT_MIN_USES


class KVTierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host_gib: float = Field(default=0.0, ge=0, description="G2: host memory for KV blocks.")
    disk_gib: float = Field(default=0.0, ge=0, description="G3: local disk for KV blocks.")
    disk_dir: Path | None = Field(default=None, description="G3: this worker's own directory.")
    s3_uri: str | None = Field(default=None, description="G4: s3://bucket/prefix, per model.")
    s3_gib: float | None = Field(
        default=None, gt=0, description="G4: cap on this worker's own writes (default none)."
    )
    min_uses: int = Field(
        default=DEFAULT_MIN_USES,
        ge=1,
        description="Requests that must use a block before a deeper tier takes a copy.",
    )
    s3_list_interval_s: float = Field(default=5.0, gt=0)
    cost_check: bool = Field(
        default=True,
        description="Onboard only when moving a prefix is estimated faster than recomputing it.",
    )

    @model_validator(mode="after")
    def _check(self) -> KVTierConfig:
        if self.disk_gib > 0 and self.disk_dir is None:
            raise ValueError("--kv-disk-gib needs --kv-disk-dir (a directory for this worker)")
        if self.disk_dir is not None and self.disk_gib <= 0:
            raise ValueError("--kv-disk-dir needs --kv-disk-gib > 0")
        if self.s3_uri is not None:
            parse_s3_uri(self.s3_uri)
        return self

    @property
    def enabled(self) -> bool:
        return self.host_gib > 0 or self.disk_gib > 0 or self.s3_uri is not None


def tier_worker_args(
    *,
    host_gib: float,
    disk_gib: float,
    disk_dir: Path | None,
    s3_uri: str | None,
    worker_index: int,
    model_name: str,
) -> list[str]:
    """The KV tier flags of one local worker started by ``strata serve``.

    Each worker gets its own disk directory (``<disk_dir>/<model>-<index>``); every worker of a
    model shares ``<s3_uri>/<model>`` (one prefix per served model, so models never mix).
    """
    args: list[str] = []
    if host_gib > 0:
        args += ["--kv-host-gib", str(host_gib)]
    if disk_gib > 0:
        if disk_dir is None:
            raise ValueError("--kv-disk-gib needs --kv-disk-dir")
        args += ["--kv-disk-gib", str(disk_gib)]
        args += ["--kv-disk-dir", str(Path(disk_dir) / f"{model_name}-{worker_index}")]
    if s3_uri is not None:
        args += ["--kv-s3-uri", f"{s3_uri.rstrip('/')}/{model_name}"]
    return args


def parse_tier_weights(values: list[str]) -> dict[str, float]:
    """``["CPU=0.9", "DISK=0.5"]`` -> {medium: weight}; ValueError naming the bad entry."""
    weights: dict[str, float] = {}
    for value in values:
        medium, sep, weight = value.partition("=")
        try:
            if not sep or not medium:
                raise ValueError
            weights[medium.strip().upper()] = float(weight)
        except ValueError:
            raise ValueError(
                f"--kv-tier-weight {value!r}: expected MEDIUM=WEIGHT, e.g. CPU=0.9"
            ) from None
    return weights
