"""Planner test factories: a profile built from the mock engine's default timing model (no
engine needed), configs with small overrides, and observations at an injected time."""

from __future__ import annotations

import math
from typing import Any

import pytest

from serving.engine.timing import TimingProfile
from serving.planner.capacity import CapacityModel
from serving.planner.config import PlannerConfig, parse_config
from serving.planner.core import PlannerState, make_state
from serving.planner.profile import PerfProfile
from serving.planner.types import Observation, RoleObservation, Traffic

# The replay's H100 shape: 1024 blocks of 512 tokens, Llama-3-8B KV.
NUM_BLOCKS, BLOCK_SIZE = 1024, 512
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
CONTEXTS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def formula_profile(
    num_blocks: int = NUM_BLOCKS,
    block_size: int = BLOCK_SIZE,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 8192,
) -> PerfProfile:
    """What ``strata profile --engine mock`` measures, computed from the formulas directly."""
    timing = TimingProfile()
    capacity = num_blocks * block_size
    prefill = [(n, timing.prefill_ms(n)) for n in (16, 64, 256, 1024, 2048, 4096, 8192)]
    prefill = [(n, ms) for n, ms in prefill if n <= max_num_batched_tokens]
    rows = [
        [
            timing.decode_ms(min(b * math.ceil(c / block_size) * block_size / capacity, 1.0))
            for c in CONTEXTS
        ]
        for b in BATCH_SIZES
    ]
    return PerfProfile(
        engine="mock",
        model="m",
        block_size=block_size,
        num_blocks=num_blocks,
        kv_capacity_tokens=capacity,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=capacity,
        prefill=prefill,
        decode_grid={"batch_sizes": BATCH_SIZES, "context_tokens": CONTEXTS, "ms": rows},
    )


@pytest.fixture(scope="session")
def profile() -> PerfProfile:
    return formula_profile()


def make_config(**overrides: Any) -> PlannerConfig:
    data: dict[str, Any] = {
        "model": "m",
        "profile": "unused.json",
        "roles": {"both": {"min_replicas": 1, "max_replicas": 10}},
        "predictor": {"kind": "constant"},
        "scaling": {"interval_s": 10, "model_interval_s": 10, "scale_down_stabilization_s": 300},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data)


def make_planner(profile: PerfProfile, **overrides: Any) -> PlannerState:
    config = make_config(**overrides)
    capacity = CapacityModel(
        profile, config.sla, target_utilization=config.scaling.target_utilization
    )
    return make_state(config, capacity)


def traffic(rate: float, isl: float = 1000, osl: float = 200, window_s: float = 60.0) -> Traffic:
    return Traffic(
        window_s=window_s,
        request_rate=rate,
        num_requests=rate * window_s,
        input_tokens=isl if rate > 0 else None,
        output_tokens=osl if rate > 0 else None,
        output_tokens_rate=rate * osl,
    )


def observe(
    time_s: float,
    replicas: dict[str, int],
    load: Traffic | None,
    *,
    error: str | None = None,
    waiting: dict[str, float] | None = None,
    starting: dict[str, int] | None = None,
    lead_times: dict[str, tuple[float, ...]] | None = None,
) -> Observation:
    roles = {
        role: RoleObservation(
            ready=count,
            starting=(starting or {}).get(role, 0),
            num_waiting=(waiting or {}).get(role, 0.0),
            lead_times_s=(lead_times or {}).get(role, ()),
        )
        for role, count in replicas.items()
    }
    return Observation(time_s, roles, load, error)
