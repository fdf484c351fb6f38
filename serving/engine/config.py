"""Engine settings, parsed and validated once (from the CLI or a file), then passed around."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

EngineKind = Literal["builtin", "mock"]


class EngineConfig(BaseModel):
    """How to build one engine. ``extra="forbid"``: a misspelt setting is an error, not a no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dir: Path | None = Field(
        default=None, description="Hugging Face checkpoint directory (optional for the mock)."
    )
    engine: EngineKind = "builtin"
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # "dummy": random weights from config.json alone (benchmarks of large shapes), as vLLM's.
    load_format: Literal["auto", "dummy"] = "auto"
    block_size: int = Field(default=16, ge=1, le=1024)
    num_blocks: int | None = Field(
        default=None, ge=1, description="KV blocks; default from memory (real) or 8192 (mock)."
    )
    kv_cache_bytes: int | None = Field(default=None, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=2048, ge=1)
    max_model_len: int | None = Field(default=None, ge=2)
    enable_prefix_caching: bool = True
    # CUDA: decode steps replay CUDA graphs unless this is set (vLLM's --enforce-eager).
    enforce_eager: bool = False
    kernels: Literal["auto", "torch", "triton"] = Field(
        default="auto", description="auto: Triton kernels on CUDA, the PyTorch path on CPU."
    )
    # Prefill role: seconds a finished request's blocks wait for a decode worker's pull.
    kv_lease_s: float = Field(default=30.0, gt=0)
    seed: int = 0
    # Mock engine only.
    speedup: float = Field(default=1.0, gt=0)
    timing_profile: Path | None = None
    vocab_size: int | None = Field(default=None, ge=2, description="Mock without a model dir.")
    kv_bytes_per_token: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.engine == "builtin" and self.model_dir is None:
            raise ValueError("model_dir is required for the builtin engine")
        if self.engine == "mock" and self.model_dir is None and self.vocab_size is None:
            raise ValueError("the mock engine needs model_dir (for a tokenizer) or vocab_size")
        if self.model_dir is not None and not Path(self.model_dir).is_dir():
            raise ValueError(f"model_dir {self.model_dir} is not a directory")
        return self
