"""benchmark: a short load test against the candidate, compared with the model's SLO.

Streams ``num_requests`` chat completions at ``concurrency`` with fixed output lengths
(``ignore_eos``), and measures time to first token and inter-token latency from the stream as
the client sees it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
import openai

PROMPTS = (
    "Explain how a lighthouse works.",
    "Write a short poem about the sea.",
    "Give three tips for learning a new language.",
    "Describe the water cycle.",
    "What makes a good cup of coffee?",
    "Summarise the plot of a detective story you invent.",
)


@dataclass(frozen=True, slots=True)
class BenchReport:
    num_requests: int
    concurrency: int
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    itl_p95_ms: float
    output_tokens_per_s: float
    duration_s: float

    def as_metrics(self) -> dict[str, float]:
        return {
            "bench_ttft_p50_ms": round(self.ttft_p50_ms, 3),
            "bench_ttft_p95_ms": round(self.ttft_p95_ms, 3),
            "bench_itl_p50_ms": round(self.itl_p50_ms, 3),
            "bench_itl_p95_ms": round(self.itl_p95_ms, 3),
            "bench_output_tokens_per_s": round(self.output_tokens_per_s, 3),
            "bench_duration_s": round(self.duration_s, 3),
        }


@dataclass(frozen=True, slots=True)
class SLOVerdict:
    passed: bool
    violations: list[str]


def check_slo(report: BenchReport, ttft_p95_ms: float, itl_p95_ms: float) -> SLOVerdict:
    violations = []
    if report.ttft_p95_ms > ttft_p95_ms:
        violations.append(f"TTFT p95 {report.ttft_p95_ms:.1f} ms > SLO {ttft_p95_ms:.1f} ms")
    if report.itl_p95_ms > itl_p95_ms:
        violations.append(f"ITL p95 {report.itl_p95_ms:.1f} ms > SLO {itl_p95_ms:.1f} ms")
    return SLOVerdict(not violations, violations)


def run_benchmark(
    endpoint: str,
    model: str,
    *,
    num_requests: int = 16,
    concurrency: int = 4,
    max_tokens: int = 32,
) -> BenchReport:
    return asyncio.run(_run(endpoint, model, num_requests, concurrency, max_tokens))


async def _run(
    endpoint: str, model: str, num_requests: int, concurrency: int, max_tokens: int
) -> BenchReport:
    ttfts_s: list[float] = []
    itls_s: list[float] = []
    num_tokens = 0
    limit = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(
        base_url=f"{endpoint.rstrip('/')}/v1", api_key="unused", timeout=600, max_retries=0
    ) as client:

        async def one(i: int) -> None:
            nonlocal num_tokens
            async with limit:
                started = time.perf_counter()
                last: float | None = None
                stream = await client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    max_tokens=max_tokens,
                    temperature=0,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                async for chunk in stream:
                    if not chunk.choices:
                        continue
                    got = len(chunk.choices[0].model_extra.get("token_ids") or []) or int(
                        bool(chunk.choices[0].delta.content)
                    )
                    if not got:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        ttfts_s.append(now - started)
                    else:
                        itls_s.extend([(now - last) / got] * got)
                    last = now
                    num_tokens += got

        # One request first, unmeasured: a fresh worker's first pass pays one-off costs
        # (allocation, lazy initialisation) that say nothing about its steady state.
        await one(0)
        ttfts_s.clear()
        itls_s.clear()
        num_tokens = 0
        started_s = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(num_requests)))
        duration_s = time.perf_counter() - started_s

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q) * 1000) if values else float("nan")

    return BenchReport(
        num_requests=num_requests,
        concurrency=concurrency,
        ttft_p50_ms=pct(ttfts_s, 50),
        ttft_p95_ms=pct(ttfts_s, 95),
        itl_p50_ms=pct(itls_s, 50),
        itl_p95_ms=pct(itls_s, 95),
        output_tokens_per_s=num_tokens / duration_s,
        duration_s=duration_s,
    )
