"""``strata bench replay``'s settings: one ``ReplayConfig`` per run, parsed once at the CLI edge.

``trace`` is a Mooncake-format JSONL file given by the caller, e.g. the Mooncake FAST'25
``conversation_trace.jsonl`` (github.com/kvcache-ai/Mooncake, ``FAST25-release/traces``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bench.replay_tiers import DEFAULT_KV_BYTES_PER_TOKEN
from serving.engine.kv_transfer import DEFAULT_LEASE_S
from serving.router.disagg import (
    DEFAULT_MAX_LOCAL_PREFILL_FRACTION,
    DEFAULT_MAX_LOCAL_PREFILL_TOKENS,
)
from serving.router.policies import DEFAULT_PREFILL_SCALE, PolicyName

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS_DIR = REPO_ROOT / "bench" / "results"
PREFIX_POLICIES = ("kv", "approx")  # policies that read the prompt's block hashes


def _non_negative(default: float, description: str) -> Any:
    """A field of ``default`` that takes any value from 0 (counts, seconds)."""
    return Field(default=default, ge=0, description=description)


def _positive(default: float, description: str) -> Any:
    """A field of ``default`` that takes any value above 0 (rates, bandwidths, durations)."""
    return Field(default=default, gt=0, description=description)


class ReplayConfig(BaseModel):
    """One replay run, parsed once at the CLI edge. ``extra="forbid"`` at every level."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    trace: Path = Field(description="Mooncake-format JSONL trace, or an Azure LLM trace (.csv).")
    workers: int = _non_negative(8, "Aggregated engines (each prefills and decodes).")
    prefill_workers: int = _non_negative(0, "Prefill-only engines: remote prefill for the others.")
    decode_workers: int = _non_negative(0, "Decode-only engines: routed to like aggregated ones.")
    kv_bandwidth_gbps: float = _positive(25.0, "KV pull bandwidth in GB/s (1e9 bytes).")
    max_local_prefill_tokens: int = _non_negative(
        DEFAULT_MAX_LOCAL_PREFILL_TOKENS,
        "Disaggregation: uncached prompt tokens the decode worker prefills itself.",
    )
    max_local_prefill_fraction: float = Field(
        default=DEFAULT_MAX_LOCAL_PREFILL_FRACTION,
        ge=0,
        le=1,
        description="Disaggregation: ... and at most this share of the prompt.",
    )
    kv_lease_s: float = _positive(
        DEFAULT_LEASE_S, "Disaggregation: how long a prefill engine keeps finished KV for a pull."
    )
    routers: tuple[PolicyName, ...] = Field(default=("kv",), min_length=1)
    engine: Literal["mock"] = "mock"
    mode: Literal["offline", "online"] = "offline"
    kv_blocks_per_worker: int = Field(default=1024, ge=1, description="KV blocks per engine.")
    block_size: int = Field(default=512, ge=1, description="Tokens per hash id and KV block.")
    speedup: float = _positive(1.0, "Divide trace arrival times by this.")
    limit: int | None = Field(default=None, ge=1, description="Replay the first K requests.")
    arrival_jitter_s: float = _non_negative(
        0.0, "Spread arrivals uniformly over this window (trace s)."
    )
    kv_prefill_scale: float = _positive(
        DEFAULT_PREFILL_SCALE, "kv/approx cost: weight of uncached prompt blocks."
    )
    kv_tier_weights: dict[str, float] = Field(
        default_factory=dict, description="kv cost: credit per cached block by medium (CPU, S3)."
    )
    kv_host_blocks_per_worker: int = _non_negative(
        0, "KV tiers: G2 (host memory) blocks per engine; 0: none."
    )
    kv_s3_blocks: int = _non_negative(0, "KV tiers: blocks of one G4 (S3) shared by all; 0: none.")
    kv_host_bandwidth_gbps: float = _positive(
        55.0, "KV tiers: G2 -> device GB/s (pinned, H100 measured)."
    )
    kv_s3_bandwidth_gbps: float = _positive(
        2.0, "KV tiers: G4 -> device GB/s per worker (assumed)."
    )
    kv_s3_latency_s: float = _non_negative(
        0.03, "KV tiers: G4 latency per round of 8 parallel reads."
    )
    kv_offload_min_uses: int = Field(
        default=2, ge=1, description="KV tiers: uses before a block is copied G2 -> G4."
    )
    kv_bytes_per_token: int = Field(
        default=DEFAULT_KV_BYTES_PER_TOKEN, ge=1, description="KV tiers: bytes per token."
    )
    seed: int = 0
    vocab_size: int = Field(default=32_000, ge=2)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=8192, ge=1)
    timing_profile: Path | None = None
    url: str | None = Field(default=None, description="Online mode: OpenAI base URL.")
    out: Path | None = None

    @model_validator(mode="after")
    def _check_pools(self) -> ReplayConfig:
        if self.workers + self.decode_workers < 1:
            raise ValueError(
                "no engine can decode: workers (aggregated) + decode_workers must be >= 1"
            )
        if self.mode == "online" and self.is_disaggregated:
            raise ValueError(
                "online mode does not run prefill/decode pools yet: use --mode offline"
            )
        return self

    @property
    def is_disaggregated(self) -> bool:
        return self.prefill_workers + self.decode_workers > 0

    @property
    def num_engines(self) -> int:
        return self.workers + self.prefill_workers + self.decode_workers

    @property
    def has_tiers(self) -> bool:
        return bool(self.kv_host_blocks_per_worker or self.kv_s3_blocks)


def default_out_path(config: ReplayConfig) -> Path:
    routers = "-".join(config.routers)
    pools = f"w{config.workers}"
    if config.is_disaggregated:
        pools += f"-p{config.prefill_workers}-d{config.decode_workers}"
    return DEFAULT_RESULTS_DIR / f"replay-{config.mode}-{routers}-{pools}.json"
