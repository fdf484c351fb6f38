"""Worker settings: the engine's, plus where to listen and publish. Parsed once at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.engine.config import EngineConfig
from serving.kvcache.config import KVTierConfig
from serving.worker.efa import SYSFS_INFINIBAND, EFAMode

WorkerRole = Literal["prefill", "decode", "both"]
KVTransportKind = Literal["auto", "nixl", "tcp", "none"]


class WorkerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = Field(default=8001, ge=0, le=65535)
    served_model_name: list[str] = Field(default_factory=list)
    # KV events: PUB on this port, replay ROUTER on kv_events_port + 1; None disables events.
    kv_events_port: int | None = Field(default=None, ge=0, le=65535)
    kv_events_host: str = "*"
    # Seconds to let in-flight requests finish after SIGTERM before stopping.
    drain_timeout_s: float = Field(default=30.0, ge=0)
    log_level: str = "info"
    # Disaggregation. The role is advertised to the frontend (/health); any role serves any
    # request. The KV transport defaults to "auto" (NIXL, else loud TCP) for prefill and
    # decode workers and to "none" for aggregated ones.
    role: WorkerRole = "both"
    kv_transport: KVTransportKind | None = None
    # Where peers reach the transport's side channel (default: ``host``; port 0: any free).
    kv_transfer_host: str | None = None
    kv_transfer_port: int = Field(default=0, ge=0, le=65535)
    # Mock engine only: the link speed its modelled KV transfers take.
    mock_kv_bandwidth_gbps: float = Field(default=25.0, gt=0)
    # EFA at start (serving/worker/efa.py): off | required | fallback.
    efa: EFAMode = "off"
    efa_sysfs_dir: Path = SYSFS_INFINIBAND
    # KV tiers below the device (G2 host, G3 disk, G4 S3); all off by default.
    kv_tiers: KVTierConfig = Field(default_factory=KVTierConfig)

    @property
    def resolved_kv_transport(self) -> KVTransportKind:
        if self.kv_transport is not None:
            return self.kv_transport
        return "none" if self.role == "both" else "auto"

    @property
    def model_names(self) -> list[str]:
        if self.served_model_name:
            return list(self.served_model_name)
        if self.engine.model_dir is not None:
            return [self.engine.model_dir.name]
        return ["mock"]
