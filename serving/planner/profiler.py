"""Measure an engine in this process: prefill step time against prompt tokens, decode step time
against batch size and context length. ``strata profile --engine builtin|mock``.

Each measurement runs real requests through ``EngineCore.step()``: the mock engine reports its
modelled step time (``step_duration_s``), the built-in engine is timed on the wall clock (the
step returns after the device has produced the tokens). Prompts are random token ids, distinct
per request, so no measurement is helped by the prefix cache.

Owns the measurement plan and the loop over ``step()``; never writes files or parses flags.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from serving.engine.core import EngineCore
from serving.engine.request import Request, SamplingParams
from serving.planner.profile import PROFILE_FORMAT, DecodeGridModel, PerfProfile

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProfilePlan:
    """What to measure. Cells that cannot fit the engine (batch x context over the KV pool or
    ``max_num_seqs``) are measured at the largest batch that fits (see ``grid_batch``)."""

    prefill_tokens: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    context_tokens: tuple[int, ...]
    decode_steps: int = 4  # decode steps timed per cell (the median is kept)
    repeats: int = 1  # prefill measurements per point (the median is kept)


def default_plan(core: EngineCore, *, wall_clock: bool) -> ProfilePlan:
    """Powers of two up to the engine's limits; fewer, smaller cells on the wall clock."""
    cfg, limits = core.scheduler_config, core.limits
    max_prefill = min(cfg.max_num_batched_tokens, limits.max_model_len - 1)
    top_context = min(limits.max_model_len // 2, 32_768 if not wall_clock else 2048)
    return ProfilePlan(
        prefill_tokens=_powers_of_two(16, max_prefill, include_top=True),
        batch_sizes=_powers_of_two(1, cfg.max_num_seqs if not wall_clock else 32, True),
        context_tokens=_powers_of_two(128, max(top_context, 128), include_top=True),
        decode_steps=4 if not wall_clock else 3,
        repeats=1 if not wall_clock else 3,
    )


def _powers_of_two(low: int, high: int, include_top: bool) -> tuple[int, ...]:
    values = []
    value = low
    while value < high:
        values.append(value)
        value *= 2
    if include_top or not values:
        values.append(high)
    return tuple(sorted(set(values)))


class EngineProfiler:
    """Drives one ``EngineCore`` through a ``ProfilePlan``; no I/O besides the engine."""

    def __init__(
        self,
        core: EngineCore,
        vocab_size: int,
        *,
        seed: int = 0,
        clock: Callable[[], float] = time.perf_counter,
        progress: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.core = core
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(seed)
        self.clock = clock
        self.progress = progress
        self._next_id = 0

    def measure(self, plan: ProfilePlan) -> tuple[list[tuple[int, float]], DecodeGridModel]:
        self._warm_up()
        prefill = [(n, self.prefill_ms(n, plan.repeats)) for n in plan.prefill_tokens]
        self.progress(f"prefill: {len(prefill)} points")
        rows = []
        for batch in plan.batch_sizes:
            rows.append(
                [self.decode_ms(batch, ctx, plan.decode_steps) for ctx in plan.context_tokens]
            )
            self.progress(f"decode: batch {batch} done")
        grid = DecodeGridModel(
            batch_sizes=list(plan.batch_sizes), context_tokens=list(plan.context_tokens), ms=rows
        )
        return prefill, grid

    # -- one measurement -----------------------------------------------------------------------

    def prefill_ms(self, num_tokens: int, repeats: int = 1) -> float:
        """One step that computes a ``num_tokens`` prompt and samples its first token."""
        samples = []
        for _ in range(repeats):
            self._add(num_tokens, max_tokens=1)
            samples.append(self._timed_step())
            self._drain()
        return statistics.median(samples) * 1000.0

    def decode_ms(self, batch_size: int, context_tokens: int, num_steps: int) -> float:
        """Median step time of ``batch_size`` sequences decoding after ``context_tokens``."""
        batch = self.grid_batch(batch_size, context_tokens, num_steps)
        if batch == 0:
            raise ValueError(f"a {context_tokens}-token context does not fit this engine")
        # Room to decode while the others still prefill (chunked), then abort after timing.
        max_tokens = self.core.limits.max_model_len - context_tokens - 1
        ids = [self._add(context_tokens, max_tokens=max_tokens) for _ in range(batch)]
        started: set[str] = set()
        while len(started) < len(ids):  # prefill every sequence (maybe over several steps)
            result = self.core.step()
            started.update(out.request_id for out in result.outputs)
        samples = [self._timed_step() for _ in range(num_steps)]
        self.core.abort_requests(ids)
        self._drain()
        return statistics.median(samples) * 1000.0

    def grid_batch(self, batch_size: int, context_tokens: int, num_steps: int) -> int:
        """The batch actually run for a cell: capped by ``max_num_seqs`` and the KV pool."""
        limits = self.core.limits
        # Sequences prefilled first decode while the others prefill: leave them room.
        prefill_steps = -(
            -(batch_size * context_tokens) // self.core.scheduler_config.max_num_batched_tokens
        )
        blocks_per_seq = -(-(context_tokens + num_steps + prefill_steps + 2) // limits.block_size)
        fits = limits.num_blocks // blocks_per_seq
        return min(batch_size, self.core.scheduler_config.max_num_seqs, fits)

    # -- helpers -------------------------------------------------------------------------------

    def _add(self, num_tokens: int, max_tokens: int) -> str:
        request_id = f"profile-{self._next_id}"
        self._next_id += 1
        prompt = self.rng.integers(0, self.vocab_size, num_tokens).tolist()
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        self.core.add_request(Request(request_id, prompt, params, eos_token_id=None))
        return request_id

    def _timed_step(self) -> float:
        started = self.clock()
        result = self.core.step()
        wall = self.clock() - started
        return result.step_duration_s if result.step_duration_s is not None else wall

    def _drain(self) -> None:
        while self.core.has_unfinished_requests():
            self.core.step()
        self.core.take_kv_events()

    def _warm_up(self) -> None:
        """One short request first: the first step of a real engine pays one-off costs."""
        self._add(16, max_tokens=2)
        self._drain()


def profile_engine(
    core: EngineCore,
    *,
    engine: str,
    model: str,
    device: str,
    vocab_size: int,
    plan: ProfilePlan | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> PerfProfile:
    """Measure ``core`` and return the profile (the caller saves it)."""
    wall_clock = engine != "mock"
    plan = plan or default_plan(core, wall_clock=wall_clock)
    _check_plan(core, plan)
    prefill, grid = EngineProfiler(core, vocab_size, progress=progress).measure(plan)
    limits, cfg = core.limits, core.scheduler_config
    return PerfProfile(
        format=PROFILE_FORMAT,
        engine=engine,
        model=model,
        device=device,
        source="engine",
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        block_size=limits.block_size,
        num_blocks=limits.num_blocks,
        kv_capacity_tokens=limits.num_blocks * limits.block_size,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_model_len=limits.max_model_len,
        prefill=prefill,
        decode_grid=grid,
        notes={"timing": "wall clock" if wall_clock else "modelled step time"},
    )


def _check_plan(core: EngineCore, plan: ProfilePlan) -> None:
    cfg, limits = core.scheduler_config, core.limits
    too_long = [n for n in plan.prefill_tokens if n > cfg.max_num_batched_tokens]
    if too_long:
        raise ValueError(
            f"prefill lengths {too_long} exceed max_num_batched_tokens "
            f"({cfg.max_num_batched_tokens}): one step computes at most that many tokens"
        )
    too_long = [n for n in plan.context_tokens if n + plan.decode_steps + 2 > limits.max_model_len]
    if too_long:
        raise ValueError(
            f"context lengths {too_long} do not fit max_model_len ({limits.max_model_len})"
        )
    for name, values in (
        ("prefill lengths", plan.prefill_tokens),
        ("batch sizes", plan.batch_sizes),
        ("context lengths", plan.context_tokens),
    ):
        if not values or list(values) != sorted(set(values)) or values[0] < 1:
            raise ValueError(f"{name} must be positive, increasing and non-empty: {values}")


def parse_int_list(text: str | None) -> tuple[int, ...] | None:
    """``"16,64,256"`` -> ``(16, 64, 256)``; None stays None. Raises ``ValueError``."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def override_plan(
    plan: ProfilePlan,
    prefill_tokens: Sequence[int] | None,
    batch_sizes: Sequence[int] | None,
    context_tokens: Sequence[int] | None,
) -> ProfilePlan:
    return ProfilePlan(
        prefill_tokens=tuple(prefill_tokens) if prefill_tokens else plan.prefill_tokens,
        batch_sizes=tuple(batch_sizes) if batch_sizes else plan.batch_sizes,
        context_tokens=tuple(context_tokens) if context_tokens else plan.context_tokens,
        decode_steps=plan.decode_steps,
        repeats=plan.repeats,
    )
