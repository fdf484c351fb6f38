"""The data path: a request's token stream from workers to the client, across migrations.

``client_pieces`` (latency metrics) <- ``segments`` (routing and migration) <-
``stream_from_worker`` (one worker's token-id SSE stream). If a worker dies or its stream
breaks, the request is re-sent to another worker with the tokens produced so far appended to
the prompt, and the client's stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from serving.frontend import sse
from serving.frontend.job import Job, unsent_text, worker_payload
from serving.frontend.models import ModelVersion, ServedModel
from serving.frontend.prefill import maybe_remote_prefill
from serving.frontend.router import Router
from serving.frontend.state import FrontendState
from serving.frontend.worker_errors import WorkerFailed, passthrough_error
from serving.frontend.workers import Worker
from serving.protocol.openai import APIError
from serving.router.indexer import cached_prompt_tokens
from serving.router.policies import NoWorkersError

logger = logging.getLogger(__name__)

# How often a migrating request looks for a healthy worker again (the health loop's probes and
# discovery bring workers back; they run every few seconds).
_MIGRATION_POLL_S = 0.25


async def client_pieces(
    state: FrontendState, served: ServedModel, job: Job
) -> AsyncIterator[dict[str, Any]]:
    """Worker choices with latency metrics recorded as they reach the client."""
    metrics = state.metrics
    model = job.model
    ttft, itl = metrics.ttft.labels(model=model), metrics.itl.labels(model=model)
    output_tokens = metrics.output_tokens.labels(model=model)
    try:
        async for choice in segments(state, served, job):
            token_ids = choice.get("token_ids")
            if token_ids:
                now = time.monotonic()
                if job.last_token_s is None:
                    ttft.observe(now - job.arrival_s)
                else:  # between the pieces the client receives (the worker's own is per token)
                    itl.observe(now - job.last_token_s)
                job.last_token_s = now
                output_tokens.inc(len(token_ids))
            yield choice
    finally:
        metrics.prompt_tokens.labels(model=model).inc(len(job.prompt_ids))
        metrics.cached_prompt_tokens.labels(model=model).inc(job.num_cached_tokens or 0)
        metrics.e2e.labels(model=model).observe(time.monotonic() - job.arrival_s)


async def segments(
    state: FrontendState, served: ServedModel, job: Job
) -> AsyncIterator[dict[str, Any]]:
    """Worker completion chunks for the whole request, across migrations.

    Each attempt routes within one version of the model: the job's own while it has a healthy
    worker (a migration stays on the weights it started with), else the current version.
    """
    tried: set[str] = set()
    while True:
        version = await _version_to_try(state, served, job)
        job.version = version.version
        pool, router = version.pool, version.router
        candidates = [w for w in pool.decode_ids() if w not in tried]
        if not candidates:
            candidates = pool.decode_ids()  # every worker failed once: try again
        routing_id = f"{job.request_id}#{job.num_migrations}"
        try:
            decision = router.route(routing_id, job.prompt_ids + job.output_ids, candidates,
                                    job.session_id)  # fmt: skip
        except NoWorkersError:
            raise _no_worker() from None
        worker = pool.workers[decision.worker_id]
        job.predicted_cached_tokens = cached_prompt_tokens(
            decision.num_cached_blocks, router.block_size, len(job.prompt_ids)
        )
        tried.add(worker.worker_id)
        worker.num_requests += 1
        if worker.first_request_s is None:
            worker.first_request_s = time.monotonic()
        resumed_text = unsent_text(served.tokenizer, job) if job.num_migrations else ""
        try:
            kv_params = await maybe_remote_prefill(state, version, job, decision.num_cached_blocks)
            stream = stream_from_worker(state, router, job, worker, routing_id, kv_params)
            async for chunk in stream:
                if resumed_text:
                    chunk = {**chunk, "text": resumed_text + (chunk.get("text") or "")}
                    resumed_text = ""
                job.sent_text += chunk.get("text") or ""
                yield chunk
            router.finish(routing_id)
            return
        except WorkerFailed as exc:
            router.finish(routing_id)
            pool.mark_failed(worker.worker_id, str(exc))
            if job.num_migrations >= state.settings.migration_limit:
                raise APIError(
                    f"worker failed and the migration limit ({state.settings.migration_limit}) "
                    f"was reached: {exc}",
                    status_code=503,
                    type="ServiceUnavailableError",
                ) from None
            job.num_migrations += 1
            state.metrics.migrations.labels(model=job.model).inc()
            logger.warning(
                "request %s: worker %s failed after %d tokens (%s); migrating",
                job.request_id,
                worker.worker_id,
                len(job.output_ids),
                exc,
            )
        except BaseException:
            router.finish(routing_id)
            raise


async def _version_to_try(state: FrontendState, served: ServedModel, job: Job) -> ModelVersion:
    """The version to route the next attempt in. A migrating request waits up to
    ``migration_wait_s`` for a worker to be healthy again (a restarted one, or one marked failed
    for a timeout while this process was busy) rather than cutting a stream it has started."""
    deadline = time.monotonic() + (state.settings.migration_wait_s if job.num_migrations else 0)
    while True:
        version = served.version_for(job.version)
        if version is not None and version.pool.decode_ids():
            return version
        if time.monotonic() >= deadline:
            raise _no_worker()
        await asyncio.sleep(_MIGRATION_POLL_S)


def _no_worker() -> APIError:
    return APIError(
        "no healthy worker is available", status_code=503, type="ServiceUnavailableError"
    )


async def stream_from_worker(
    state: FrontendState,
    router: Router,
    job: Job,
    worker: Worker,
    routing_id: str,
    kv_params: dict[str, Any] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """One worker's token-id stream as choices; keeps ``job`` and the router's load current.

    Raises ``WorkerFailed`` (migrate) on a broken connection, a 5xx or a stream that ends
    without a finish reason; ``APIError`` for a 4xx (the request itself is bad).
    """
    payload = worker_payload(job, worker)
    if kv_params is not None:
        payload["kv_transfer_params"] = kv_params
    reader = _WorkerStream(router, job, routing_id)
    url = f"{worker.url}/v1/completions"
    async with state.workers_client.stream(url, sse.encode_json(payload)) as response:
        if response.status >= 500:
            raise WorkerFailed(f"HTTP {response.status}")
        if response.status != 200:
            raise passthrough_error(response.status, await response.read())
        decoder = sse.SSEDecoder()
        async for raw in response.chunks():
            # After [DONE] the body is read to its end, so the connection is reused.
            choices, failure = reader.take(decoder.feed(raw))
            for choice in sse.merge_choices(choices) if choices else ():
                yield choice
            if failure is not None:
                raise failure
        if job.finish_reason is None:
            raise WorkerFailed("connection closed mid-stream")


class _WorkerStream:
    """One worker stream's state: what its events mean for the job and the router's load."""

    __slots__ = ("done", "first", "job", "router", "routing_id")

    def __init__(self, router: Router, job: Job, routing_id: str) -> None:
        self.router, self.job, self.routing_id = router, job, routing_id
        self.first = True
        self.done = False

    def take(self, events: list[bytes]) -> tuple[list[dict[str, Any]], WorkerFailed | None]:
        """The choices in ``events``, and the failure that ended them (the choices before it
        still go to the client)."""
        choices: list[dict[str, Any]] = []
        for data in events:
            if self.done:
                continue
            try:
                choice = self._event(data)
            except WorkerFailed as exc:
                return choices, exc
            if choice is not None:
                choices.append(choice)
        return choices, None

    def _event(self, data: bytes) -> dict[str, Any] | None:
        job = self.job
        if data == sse.DONE:
            if job.finish_reason is None:
                raise WorkerFailed("stream ended without a finish reason")
            self.done = True
            return None
        try:
            chunk = sse.decode(data)
        except msgspec.DecodeError as exc:
            raise WorkerFailed(f"worker sent bad JSON: {exc}") from None
        if "error" in chunk:
            raise WorkerFailed(f"worker error: {chunk['error'].get('message')}")
        usage = chunk.get("usage")
        if usage and job.num_cached_tokens is None:
            details = usage.get("prompt_tokens_details") or {}
            reported = details.get("cached_tokens")
            predicted = job.predicted_cached_tokens
            job.num_cached_tokens = reported if reported is not None else predicted
        if not chunk.get("choices"):
            return None
        choice = chunk["choices"][0]
        token_ids = choice.get("token_ids")
        if token_ids:
            if self.first:
                self.router.first_token(self.routing_id)
                self.first = False
            self.router.tokens(self.routing_id, len(token_ids))
            job.output_ids.extend(token_ids)
        if choice.get("finish_reason") is not None:
            job.finish_reason = choice["finish_reason"]
            job.stop_reason = choice.get("stop_reason")
        return choice
