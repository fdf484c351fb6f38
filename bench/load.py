"""Online replay: send a trace's requests to an OpenAI-compatible endpoint at trace time.

The same requests (token-id prompts from ``PromptBuilder``) as the offline replay, sent as
streaming ``/v1/completions`` with ``ignore_eos`` and ``max_tokens = output_length``, each at
``arrival_s / speedup`` after the start, whatever the server's backlog (an open loop, as a
trace is). TTFT and ITL come from the SSE stream as the client sees it; the prefix hit rate from
each response's ``usage.prompt_tokens_details.cached_tokens``. Per-worker imbalance is not
visible from the client: the frontend's ``/metrics`` has it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.trace import PromptBuilder, TraceRequest


class LoadError(RuntimeError):
    """The endpoint could not be used at all (no model listed, connection refused)."""


@dataclass(slots=True)
class StreamResult:
    """One request as the client saw it; times in seconds from the replay's start."""

    index: int
    sent_s: float
    prompt_tokens: int
    first_token_s: float | None = None
    finished_s: float | None = None
    output_tokens: int = 0
    cached_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finished_s is not None


async def first_model(client: httpx.AsyncClient) -> str:
    response = await client.get("models")
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise LoadError(f"{client.base_url}models lists no model")
    return str(models[0]["id"])


async def stream_completion(
    client: httpx.AsyncClient,
    model: str,
    request: TraceRequest,
    prompt: list[int],
    started: float,
) -> StreamResult:
    """POST one streaming completion and time its chunks; errors are recorded, not raised."""
    sent = time.perf_counter()
    result = StreamResult(request.index, sent - started, len(prompt))
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": request.output_length,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    last = sent
    try:
        async with client.stream("POST", "completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    result.finished_s = time.perf_counter() - started
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage")
                if usage:
                    details = usage.get("prompt_tokens_details") or {}
                    result.cached_tokens = int(details.get("cached_tokens") or 0)
                num_tokens = _chunk_tokens(chunk)
                if not num_tokens:
                    continue
                now = time.perf_counter()
                if result.first_token_s is None:
                    result.first_token_s = now - sent
                    # the worker merges outputs queued behind a slow reader: the first
                    # chunk's other tokens arrived with it (gaps of 0), so the record
                    # keeps one gap per token after the first
                    result.itl_s.extend([0.0] * (num_tokens - 1))
                else:  # a chunk of k tokens after a gap g counts as k gaps of g / k
                    result.itl_s.extend([(now - last) / num_tokens] * num_tokens)
                last = now
                result.output_tokens += num_tokens
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _chunk_tokens(chunk: dict[str, Any]) -> int:
    """Tokens a chunk carries: its ``token_ids`` (vLLM extension) or 1 for non-empty text."""
    total = 0
    for choice in chunk.get("choices") or []:
        token_ids = choice.get("token_ids")
        if token_ids is not None:
            total += len(token_ids)
        elif choice.get("text"):
            total += 1
    return total


async def replay_online(
    base_url: str,
    requests: Sequence[TraceRequest],
    prompts: PromptBuilder,
    *,
    speedup: float = 1.0,
    model: str | None = None,
    api_key: str | None = None,
    timeout_s: float = 600.0,
    drain_s: float | None = None,
) -> list[StreamResult]:
    """Send every request at ``arrival_s / speedup`` (relative to the first); gather results.

    ``base_url`` ends in ``/v1``. Raises ``LoadError`` if the endpoint lists no model.
    ``drain_s`` bounds the wait after the last request is sent: requests still running then
    are cancelled and reported with the error "unfinished at the deadline", so an overloaded
    endpoint still yields figures.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(
        base_url=base_url.rstrip("/") + "/",
        headers=headers,
        timeout=httpx.Timeout(timeout_s, connect=30.0),
        limits=limits,
    ) as client:
        try:
            model = model or await first_model(client)
        except httpx.HTTPError as exc:
            raise LoadError(f"cannot list models at {base_url}: {exc}") from exc
        return await send_open_loop(
            client, model, requests, prompts, speedup, time.perf_counter(), drain_s=drain_s
        )


async def send_open_loop(
    client: httpx.AsyncClient,
    model: str,
    requests: Sequence[TraceRequest],
    prompts: PromptBuilder,
    speedup: float,
    started: float,
    *,
    drain_s: float | None = None,
) -> list[StreamResult]:
    """Each request at ``(arrival - first arrival) / speedup`` seconds after ``started``,
    whatever the backlog; with ``drain_s``, requests still running that long after the last
    one was sent are cancelled and reported as unfinished."""
    t0 = requests[0].arrival_s if requests else 0.0
    tasks: list[asyncio.Task[StreamResult]] = []
    for request in requests:
        delay = (request.arrival_s - t0) / speedup - (time.perf_counter() - started)
        if delay > 0:
            await asyncio.sleep(delay)
        prompt = prompts.prompt_token_ids(request)
        tasks.append(
            asyncio.create_task(stream_completion(client, model, request, prompt, started))
        )
    if drain_s is None:
        return list(await asyncio.gather(*tasks))
    _, pending = await asyncio.wait(tasks, timeout=drain_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return [
        task.result()
        if not task.cancelled()
        else StreamResult(
            request.index,
            (request.arrival_s - t0) / speedup,
            request.input_length,
            error="unfinished at the deadline",
        )
        for task, request in zip(tasks, requests, strict=True)
    ]


def summarize(results: Sequence[StreamResult], label: str) -> dict[str, Any]:
    """The offline report's per-policy figures that a client can measure."""
    import numpy as np

    ok = [r for r in results if r.ok]
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    ttft = [r.first_token_s for r in ok if r.first_token_s is not None]
    itl = [gap for r in ok for gap in r.itl_s]
    start = min((r.sent_s for r in results), default=0.0)
    end = max((r.finished_s or 0.0 for r in ok), default=0.0)

    def pct(samples: Sequence[float], qs: Sequence[int]) -> dict[str, float]:
        if not samples:
            return {f"p{q}": float("nan") for q in qs}
        values = np.percentile(np.asarray(samples, dtype=np.float64), qs)
        return {f"p{q}": float(v) for q, v in zip(qs, values, strict=True)}

    return {
        "policy": label,
        "requests": {
            "total": len(results),
            "completed": len(ok),
            "rejected": len(results) - len(ok),
        },
        "errors": sorted({r.error for r in results if r.error})[:5],
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached,
        "hit_rate": cached / prompt_tokens if prompt_tokens else 0.0,
        "output_tokens": output_tokens,
        "ttft_s": pct(ttft, (50, 90, 99)),
        "itl_s": pct(itl, (50, 90, 99)),
        "makespan_s": end - start,
        "throughput_tok_s": output_tokens / (end - start) if end > start else 0.0,
    }
