"""Measure a running OpenAI-compatible endpoint (a Strata worker or ``vllm serve``):
``strata profile --url URL``.

* Prefill: streamed ``/v1/completions`` requests, one at a time, with a random token-id prompt
  of N tokens and ``max_tokens=1``; the time to the first token is the prefill step (plus the
  HTTP overhead, which a planner pays too).
* Decode: B concurrent streams with N-token prompts and ``ignore_eos`` (vLLM's extension); the
  median gap between tokens once every stream is decoding is the decode step time at batch B
  and context N. While they run, ``/metrics``' ``vllm:kv_cache_usage_perc`` gives the KV pool
  size (tokens in use / usage), when the endpoint exposes it.

Owns the HTTP measurement; never writes files.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from serving.planner.profile import PROFILE_FORMAT, DecodeGridModel, PerfProfile
from serving.planner.profiler import ProfilePlan


class EndpointError(RuntimeError):
    """The endpoint refused or broke a measurement request; the message says which."""


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    model: str
    max_model_len: int | None


class EndpointProfiler:
    def __init__(
        self,
        base_url: str,
        vocab_size: int,
        *,
        api_key: str | None = None,
        seed: int = 0,
        timeout_s: float = 300.0,
        progress: Callable[[str], None] = lambda line: None,
    ) -> None:
        root = base_url.rstrip("/").removesuffix("/v1")
        self.root = root
        self.vocab_size = vocab_size
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.rng = np.random.default_rng(seed)
        self.timeout_s = timeout_s
        self.progress = progress
        self.kv_capacity_samples: list[float] = []

    async def info(self, client: httpx.AsyncClient) -> EndpointInfo:
        response = await client.get(f"{self.root}/v1/models", headers=self.headers)
        if response.status_code != 200:
            raise EndpointError(f"GET {self.root}/v1/models: HTTP {response.status_code}")
        card = response.json()["data"][0]
        return EndpointInfo(card["id"], card.get("max_model_len"))

    async def measure(
        self, plan: ProfilePlan, model: str
    ) -> tuple[list[tuple[int, float]], DecodeGridModel]:
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            await self._stream(client, model, 16, 2)  # warm-up
            prefill = []
            for n in plan.prefill_tokens:
                samples = []
                for _ in range(plan.repeats):
                    gaps = await self._stream(client, model, n, 1)
                    samples.append(gaps[0])
                prefill.append((n, statistics.median(samples) * 1000.0))
            self.progress(f"prefill: {len(prefill)} points")
            rows = []
            for batch in plan.batch_sizes:
                row = [
                    await self._decode_ms(client, model, batch, ctx, plan.decode_steps)
                    for ctx in plan.context_tokens
                ]
                rows.append(row)
                self.progress(f"decode: batch {batch} done")
        grid = DecodeGridModel(
            batch_sizes=list(plan.batch_sizes), context_tokens=list(plan.context_tokens), ms=rows
        )
        return prefill, grid

    async def _decode_ms(
        self, client: httpx.AsyncClient, model: str, batch: int, context: int, num_steps: int
    ) -> float:
        max_tokens = num_steps + 4
        streams = [self._stream(client, model, context, max_tokens) for _ in range(batch)]
        sampler = asyncio.create_task(self._sample_kv_usage(client, batch * (context + 2)))
        try:
            results = await asyncio.gather(*streams)
        finally:
            sampler.cancel()
        # Drop the first two gaps of each stream (the others may still be prefilling then).
        gaps = [g for gaps in results for g in gaps[3:]]
        return statistics.median(gaps or [g for gaps in results for g in gaps[1:]]) * 1000.0

    async def _stream(
        self, client: httpx.AsyncClient, model: str, num_tokens: int, max_tokens: int
    ) -> list[float]:
        """One streamed completion; returns [time to first token, gap, gap, ...] in seconds."""
        body = {
            "model": model,
            "prompt": self.rng.integers(0, self.vocab_size, num_tokens).tolist(),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
        }
        marks: list[float] = []
        started = time.perf_counter()
        async with client.stream(
            "POST", f"{self.root}/v1/completions", json=body, headers=self.headers
        ) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:300]
                raise EndpointError(
                    f"POST /v1/completions ({num_tokens}-token prompt): "
                    f"HTTP {response.status_code}: {text}"
                )
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if any(choice.get("text") is not None for choice in chunk.get("choices", [])):
                    marks.append(time.perf_counter())
        if not marks:
            raise EndpointError(f"the {num_tokens}-token request streamed no token")
        return [marks[0] - started] + [b - a for a, b in itertools.pairwise(marks)]

    async def _sample_kv_usage(self, client: httpx.AsyncClient, tokens_in_use: int) -> None:
        """Best effort: KV capacity = tokens held / reported usage, while a batch decodes."""
        try:
            while True:
                await asyncio.sleep(0.05)
                response = await client.get(f"{self.root}/metrics", timeout=5)
                usage = _kv_usage(response.text)
                if usage and usage > 0.02:
                    self.kv_capacity_samples.append(tokens_in_use / usage)
        except (httpx.HTTPError, ValueError):
            return


def _kv_usage(text: str) -> float | None:
    for family in text_string_to_metric_families(text):
        if family.name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            values = [s.value for s in family.samples]
            return max(values) if values else None
    return None


def profile_endpoint(
    base_url: str,
    *,
    vocab_size: int,
    plan: ProfilePlan,
    max_num_seqs: int,
    api_key: str | None = None,
    model: str | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> PerfProfile:
    profiler = EndpointProfiler(base_url, vocab_size, api_key=api_key, progress=progress)

    async def run() -> tuple[EndpointInfo, list[tuple[int, float]], DecodeGridModel]:
        async with httpx.AsyncClient(timeout=30) as client:
            info = await profiler.info(client)
        prefill, grid = await profiler.measure(plan, model or info.model)
        return info, prefill, grid

    info, prefill, grid = asyncio.run(run())
    samples = profiler.kv_capacity_samples
    return PerfProfile(
        format=PROFILE_FORMAT,
        engine="http",
        model=model or info.model,
        device="remote",
        source="http",
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        kv_capacity_tokens=int(statistics.median(samples)) if samples else None,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=None,
        max_model_len=info.max_model_len,
        prefill=prefill,
        decode_grid=grid,
        notes={"url": base_url, "timing": "time to first token and inter-token gaps over HTTP"},
    )
