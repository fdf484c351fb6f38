"""Worker settings: the engine's, plus where to listen and publish. Parsed once at start."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from serving.engine.config import EngineConfig


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

    @property
    def model_names(self) -> list[str]:
        if self.served_model_name:
            return list(self.served_model_name)
        if self.engine.model_dir is not None:
            return [self.engine.model_dir.name]
        return ["mock"]
