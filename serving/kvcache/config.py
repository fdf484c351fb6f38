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
