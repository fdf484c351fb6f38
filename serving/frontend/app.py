"""The frontend: one OpenAI endpoint over many workers.

It tokenizes once (the model's own tokenizer and chat template, the same code as the worker),
routes by token ids, and forwards a token-id ``/v1/completions`` stream to the chosen worker.
If the worker dies or its stream breaks, the request migrates: it is re-sent to another worker
with the tokens produced so far appended to the prompt, and the client's stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict

from serving.engine.tokenizer import encode_chat, encode_prompt
from serving.frontend.metrics import FrontendMetrics
from serving.frontend.router import Router
from serving.frontend.workers import (
    Worker,
    WorkerPool,
    WorkerRegistrationError,
    WorkerSpec,
)
from serving.protocol.openai import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    check_prompt,
    model_card,
    model_not_found,
    new_id,
    now_s,
    usage_dict,
)
from serving.router.disagg import DisaggConfig, DisaggDecision, decide, prefill_request_params
from serving.router.policies import NoWorkersError
from serving.worker.app import validation_error

logger = logging.getLogger(__name__)

_COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# Fields forwarded verbatim to workers when the client set them.
_FORWARDED = (
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "kv_transfer_params",
)


@dataclass(slots=True)
class FrontendSettings:
    served_model_names: list[str]
    max_model_len: int
    vocab_size: int
    api_key: str | None = None
    migration_limit: int = 3
    health_interval_s: float = 2.0
    max_health_failures: int = 3
    # A worker that served requests but sent no KV event for this long triggers a warning.
    kv_events_grace_s: float = 5.0
    # Prometheus file service discovery: this frontend and its workers, kept current.
    prometheus_targets_file: Path | None = None
    self_address: str | None = None  # host:port of this frontend, for the targets file
    # Conditional disaggregation (used when prefill workers are registered).
    disagg: DisaggConfig = field(default_factory=DisaggConfig)


@dataclass(slots=True)
class FrontendState:
    settings: FrontendSettings
    tokenizer: Any
    router: Router
    metrics: FrontendMetrics
    pool: WorkerPool | None = None
    http: httpx.AsyncClient | None = None
    initial_workers: list[WorkerSpec] = field(default_factory=list)
    # More registries to expose on /metrics (e.g. the workflow runner's, in `strata demo`).
    extra_registries: list[Any] = field(default_factory=list)
    background: list[asyncio.Task] = field(default_factory=list)


class WorkerRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    kv_events_endpoint: str | None = None
    replay_endpoint: str | None = None
    worker_id: str | None = None
    role: Literal["prefill", "decode", "both"] | None = None


class _WorkerFailed(Exception):
    """The worker's connection broke or it answered 5xx: migrate."""


def create_frontend_app(state: FrontendState) -> FastAPI:
    settings = state.settings
    metrics = state.metrics
    model = settings.served_model_names[0]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
        state.http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), limits=limits)
        state.pool = WorkerPool(
            state.http,
            on_events=state.router.apply_events,
            on_added=lambda w: state.router.add_worker(w.worker_id),
            on_removed=lambda w: state.router.remove_worker(w.worker_id),
            block_size=state.router.block_size,
        )
        for spec in state.initial_workers:
            await state.pool.register(spec)
        write_prometheus_targets(state)
        state.background.append(asyncio.create_task(_health_loop(state)))
        try:
            yield
        finally:
            if settings.prometheus_targets_file is not None:
                settings.prometheus_targets_file.unlink(missing_ok=True)
            for task in state.background:
                task.cancel()
            state.pool.close()
            await state.http.aclose()

    app = FastAPI(title="Strata frontend", lifespan=lifespan)
    app.state.frontend = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.requests.labels(
            model=model, endpoint=request.url.path, status=str(exc.status_code)
        ).inc()
        return JSONResponse(exc.to_dict(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.requests.labels(model=model, endpoint=request.url.path, status="400").inc()
        return JSONResponse(validation_error(exc).to_dict(), status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Response:
        key = settings.api_key
        protected = request.url.path.startswith(("/v1/", "/admin/"))
        if key and protected and request.headers.get("authorization") != f"Bearer {key}":
            error = APIError(
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                status_code=401,
                type="authentication_error",
                code="invalid_api_key",
            )
            return JSONResponse(error.to_dict(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        healthy = state.pool.healthy_ids() if state.pool else []
        status = 200 if healthy else 503
        return JSONResponse(
            {"status": "ok" if healthy else "no healthy workers", "workers": len(healthy)},
            status_code=status,
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        _refresh_gauges(state)
        body = b"".join(generate_latest(r) for r in [metrics.registry, *state.extra_registries])
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cards = [model_card(n, settings.max_model_len) for n in settings.served_model_names]
        return {"object": "list", "data": cards}

    @app.get("/admin/workers")
    async def list_workers() -> dict[str, Any]:
        assert state.pool is not None
        return {"workers": [_worker_json(w) for w in state.pool.workers.values()]}

    @app.post("/admin/workers", status_code=201)
    async def add_worker(body: WorkerRegistration) -> dict[str, Any]:
        assert state.pool is not None
        spec = WorkerSpec(body.url.rstrip("/"), body.kv_events_endpoint, body.replay_endpoint,
                          body.worker_id, body.role)  # fmt: skip
        try:
            worker = await state.pool.register(spec)
        except WorkerRegistrationError as exc:
            raise APIError(str(exc), param="url") from exc
        return _worker_json(worker)

    @app.delete("/admin/workers/{worker_id}")
    async def remove_worker(worker_id: str) -> dict[str, Any]:
        assert state.pool is not None
        worker = state.pool.deregister(worker_id)
        if worker is None:
            raise APIError(f"no worker {worker_id!r}", status_code=404, param="worker_id")
        return _worker_json(worker)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        _check_model(settings, body.model)
        if isinstance(body.prompt, str):
            prompt_ids = encode_prompt(state.tokenizer, body.prompt)
        else:
            prompt_ids = list(body.prompt)
        job = _make_job(state, body, prompt_ids, raw, "cmpl", body.max_tokens,
                        _COMPLETIONS_DEFAULT_MAX_TOKENS, body.logprobs)  # fmt: skip
        return await _respond(state, job, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        _check_model(settings, body.model)
        try:
            messages = [m.for_template() for m in body.messages]
            prompt_ids = encode_chat(
                state.tokenizer,
                messages,
                add_generation_prompt=body.add_generation_prompt,
                chat_template_kwargs=body.chat_template_kwargs,
            )
        except ValueError as exc:
            raise APIError(str(exc), param="messages") from exc
        job = _make_job(state, body, prompt_ids, raw, "chatcmpl", body.effective_max_tokens,
                        None, body.num_logprobs)  # fmt: skip
        return await _respond(state, job, chat=True)

    return app


# -- one request ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Job:
    request_id: str
    model: str
    body: ChatCompletionRequest | CompletionRequest
    prompt_ids: list[int]
    max_tokens: int
    logprobs: int | None
    session_id: str | None
    arrival_s: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int | None = None
    num_migrations: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    last_token_s: float | None = None
    sent_text: str = ""


def _unsent_text(state: FrontendState, job: _Job) -> str:
    """Text of tokens already produced that the failed worker had not sent yet (it holds back
    text that could start a stop string, and bytes of an incomplete character)."""
    skip = getattr(job.body, "skip_special_tokens", True)
    full = state.tokenizer.decode(job.output_ids, skip_special_tokens=skip)
    if full.endswith("\ufffd") or not full.startswith(job.sent_text):
        return ""
    return full[len(job.sent_text) :]


def _check_model(settings: FrontendSettings, name: str) -> None:
    if name not in settings.served_model_names:
        raise model_not_found(name)


def _make_job(
    state: FrontendState,
    body: ChatCompletionRequest | CompletionRequest,
    prompt_ids: list[int],
    raw: Request,
    prefix: str,
    max_tokens: int | None,
    default_max_tokens: int | None,
    logprobs: int | None,
) -> _Job:
    settings = state.settings
    max_tokens = check_prompt(
        prompt_ids,
        vocab_size=settings.vocab_size,
        max_model_len=settings.max_model_len,
        max_tokens=max_tokens,
        default_max_tokens=default_max_tokens,
    )
    header_id = raw.headers.get("x-request-id")
    return _Job(
        request_id=f"{prefix}-{header_id}" if header_id else new_id(prefix),
        model=body.model,
        body=body,
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        logprobs=logprobs,
        session_id=raw.headers.get("x-session-id") or body.user,
    )


def _worker_payload(job: _Job, worker: Worker) -> dict[str, Any]:
    """A token-id completions request carrying everything produced so far."""
    fields = job.body.model_dump(include=set(_FORWARDED), exclude_unset=True)
    payload: dict[str, Any] = {
        **fields,
        "model": worker.model_name,
        "prompt": job.prompt_ids + job.output_ids,
        "max_tokens": job.max_tokens - len(job.output_ids),
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    if job.logprobs is not None:
        payload["logprobs"] = job.logprobs
    return payload


async def _segments(state: FrontendState, job: _Job) -> AsyncIterator[dict[str, Any]]:
    """Worker completion chunks for the whole request, across migrations."""
    assert state.pool is not None and state.http is not None
    tried: set[str] = set()
    router = state.router
    while True:
        candidates = [w for w in state.pool.decode_ids() if w not in tried]
        if not candidates:
            candidates = state.pool.decode_ids()  # every worker failed once: try again
        routing_id = f"{job.request_id}#{job.num_migrations}"
        try:
            decision = router.route(routing_id, job.prompt_ids + job.output_ids, candidates,
                                    job.session_id)  # fmt: skip
        except NoWorkersError:
            raise APIError(
                "no healthy worker is available", status_code=503, type="ServiceUnavailableError"
            ) from None
        worker = state.pool.workers[decision.worker_id]
        tried.add(worker.worker_id)
        worker.num_requests += 1
        if worker.first_request_s is None:
            worker.first_request_s = time.monotonic()
        resumed_text = _unsent_text(state, job) if job.num_migrations else ""
        try:
            kv_params = await _maybe_remote_prefill(state, job, decision.num_cached_blocks)
            async for chunk in _stream_from_worker(state, job, worker, routing_id, kv_params):
                if resumed_text:
                    chunk = {**chunk, "text": resumed_text + (chunk.get("text") or "")}
                    resumed_text = ""
                job.sent_text += chunk.get("text") or ""
                yield chunk
            router.finish(routing_id)
            return
        except _WorkerFailed as exc:
            router.finish(routing_id)
            state.pool.mark_failed(worker.worker_id, str(exc))
            if job.num_migrations >= state.settings.migration_limit:
                raise APIError(
                    f"worker failed and the migration limit ({state.settings.migration_limit}) "
                    f"was reached: {exc}",
                    status_code=503,
                    type="ServiceUnavailableError",
                ) from None
            job.num_migrations += 1
            state.metrics.migrations.labels(model=state.metrics.model).inc()
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


async def _maybe_remote_prefill(
    state: FrontendState, job: _Job, num_cached_blocks: int
) -> dict[str, Any] | None:
    """Prefill on a prefill worker when the rule says so; the decode worker's kv params.

    Returns None to prefill on the decode worker: the uncached part is short, no prefill worker
    is healthy, the prefill worker failed (marked unhealthy, never fatal), or the request is
    resumed after a migration (the lease was consumed) or carries the client's own params.
    """
    assert state.pool is not None and state.http is not None
    metrics = state.metrics
    prefill_ids = state.pool.prefill_ids()
    if job.num_migrations or job.output_ids or job.body.kv_transfer_params is not None:
        return None
    if not prefill_ids and not any(w.role == "prefill" for w in state.pool.workers.values()):
        metrics.disagg_decisions.labels(model=metrics.model, decision="aggregated").inc()
        return None
    num_prompt = len(job.prompt_ids)
    cached = min(num_cached_blocks * state.router.block_size, num_prompt)
    decision = decide(num_prompt, cached, len(prefill_ids), state.settings.disagg)
    if decision.is_remote:
        params = await _remote_prefill(state, job, prefill_ids)
        if params is None:
            decision = DisaggDecision.LOCAL_PREFILL_FAILED
    else:
        params = None
    metrics.disagg_decisions.labels(model=metrics.model, decision=decision.value).inc()
    return params


async def _remote_prefill(
    state: FrontendState, job: _Job, prefill_ids: list[str]
) -> dict[str, Any] | None:
    """vLLM's prefill request (max_tokens=1, do_remote_decode) to the lowest-cost prefill
    worker; its response's ``kv_transfer_params``, or None on any failure."""
    assert state.pool is not None and state.http is not None
    routing_id = f"{job.request_id}#prefill"
    decision = state.router.route(routing_id, job.prompt_ids, prefill_ids, prefill=True)
    worker = state.pool.workers[decision.worker_id]
    worker.num_requests += 1
    payload = {
        **_worker_payload(job, worker),
        "max_tokens": 1,
        "stream": False,
        # The sampled token is thrown away; what matters is that the request ends length-capped
        # (the only state in which the blocks are leased), so no EOS or stop may end it first.
        "ignore_eos": True,
        "stop": [],
        "stop_token_ids": [],
        "kv_transfer_params": prefill_request_params(),
    }
    payload.pop("stream_options", None)
    started_s = time.monotonic()
    try:
        response = await state.http.post(
            f"{worker.url}/v1/completions",
            json=payload,
            headers={"x-request-id": f"{job.request_id}-prefill"},
        )
        if response.status_code >= 500:
            state.pool.mark_failed(worker.worker_id, f"prefill HTTP {response.status_code}")
            return None
        if response.status_code != 200:
            raise _passthrough_error(response)  # the request itself is bad: tell the client
        params = response.json().get("kv_transfer_params")
    except (httpx.TransportError, ValueError, AttributeError) as exc:  # unreachable, or no JSON
        state.pool.mark_failed(worker.worker_id, f"prefill failed: {exc!r}")
        return None
    finally:
        state.router.finish(routing_id)
    state.metrics.remote_prefill_seconds.labels(model=state.metrics.model).observe(
        time.monotonic() - started_s
    )
    if not isinstance(params, dict) or not params.get("do_remote_prefill"):
        logger.warning(
            "prefill worker %s returned no kv_transfer_params (no KV transport?): "
            "prefilling on the decode worker",
            worker.worker_id,
        )
        return None
    return params


async def _stream_from_worker(
    state: FrontendState,
    job: _Job,
    worker: Worker,
    routing_id: str,
    kv_params: dict[str, Any] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    assert state.http is not None
    payload = _worker_payload(job, worker)
    if kv_params is not None:
        payload["kv_transfer_params"] = kv_params
    first = True
    try:
        async with state.http.stream(
            "POST", f"{worker.url}/v1/completions", json=payload
        ) as response:
            if response.status_code >= 500:
                raise _WorkerFailed(f"HTTP {response.status_code}")
            if response.status_code != 200:
                await response.aread()
                raise _passthrough_error(response)
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    if job.finish_reason is None:
                        raise _WorkerFailed("stream ended without a finish reason")
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise _WorkerFailed(f"worker error: {chunk['error'].get('message')}")
                usage = chunk.get("usage")
                if usage and job.num_cached_tokens is None:
                    details = usage.get("prompt_tokens_details") or {}
                    job.num_cached_tokens = details.get("cached_tokens") or 0
                if not chunk.get("choices"):
                    continue
                choice = chunk["choices"][0]
                token_ids = choice.get("token_ids") or []
                if token_ids:
                    if first:
                        state.router.first_token(routing_id)
                        first = False
                    state.router.tokens(routing_id, len(token_ids))
                    job.output_ids.extend(token_ids)
                if choice.get("finish_reason") is not None:
                    job.finish_reason = choice["finish_reason"]
                    job.stop_reason = choice.get("stop_reason")
                yield choice
            if job.finish_reason is None:
                raise _WorkerFailed("connection closed mid-stream")
    except httpx.TransportError as exc:
        raise _WorkerFailed(f"{type(exc).__name__}: {exc}") from exc


def _passthrough_error(response: httpx.Response) -> APIError:
    try:
        error = response.json()["error"]
        return APIError(
            error.get("message", "worker rejected the request"),
            status_code=response.status_code,
            type=error.get("type", "invalid_request_error"),
            param=error.get("param"),
            code=error.get("code"),
        )
    except (ValueError, KeyError, TypeError):
        return APIError(response.text[:500], status_code=response.status_code)


# -- responses ---------------------------------------------------------------------------------


async def _respond(state: FrontendState, job: _Job, *, chat: bool) -> Response:
    metrics = state.metrics
    metrics.active_requests.labels(model=metrics.model).inc()
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    pieces = _client_pieces(state, job)
    if not job.body.stream:
        try:
            texts: list[str] = []
            logprobs: list[dict[str, Any]] = []
            async for choice in pieces:
                texts.append(choice.get("text") or "")
                if choice.get("logprobs"):
                    logprobs.append(choice["logprobs"])
        finally:
            metrics.active_requests.labels(model=metrics.model).dec()
        metrics.requests.labels(model=metrics.model, endpoint=endpoint, status="200").inc()
        return JSONResponse(_full_response(job, "".join(texts), logprobs, chat))

    # Streaming: wait for the first piece before sending headers, so errors keep their status.
    try:
        first = await anext(pieces)
    except StopAsyncIteration:
        first = None
    except BaseException:
        metrics.active_requests.labels(model=metrics.model).dec()
        raise

    async def body() -> AsyncIterator[str]:
        created = now_s()
        status = "200"
        try:
            if chat:
                yield _sse(_chat_chunk(job, created, {"role": "assistant", "content": ""}, None))
            if first is not None:
                yield _sse(_stream_chunk(job, created, first, chat))
            async for choice in pieces:
                yield _sse(_stream_chunk(job, created, choice, chat))
            options = job.body.stream_options
            if options is not None and options.include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield _sse(
                    {"id": job.request_id, "object": obj, "created": created,
                     "model": job.model, "choices": [], "usage": _usage(job)}
                )  # fmt: skip
        except APIError as exc:
            status = str(exc.status_code)
            yield _sse(exc.to_dict())
        finally:
            metrics.active_requests.labels(model=metrics.model).dec()
            metrics.requests.labels(model=metrics.model, endpoint=endpoint, status=status).inc()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


async def _client_pieces(state: FrontendState, job: _Job) -> AsyncIterator[dict[str, Any]]:
    """Worker choices with latency metrics recorded as they reach the client."""
    metrics = state.metrics
    model = metrics.model
    try:
        async for choice in _segments(state, job):
            num_tokens = len(choice.get("token_ids") or [])
            if num_tokens:
                now = time.monotonic()
                if job.last_token_s is None:
                    metrics.ttft.labels(model=model).observe(now - job.arrival_s)
                else:
                    metrics.itl.labels(model=model).observe(now - job.last_token_s)
                job.last_token_s = now
                metrics.output_tokens.labels(model=model).inc(num_tokens)
            yield choice
    finally:
        metrics.prompt_tokens.labels(model=model).inc(len(job.prompt_ids))
        metrics.cached_prompt_tokens.labels(model=model).inc(job.num_cached_tokens or 0)
        metrics.e2e.labels(model=model).observe(time.monotonic() - job.arrival_s)


def _usage(job: _Job) -> dict[str, Any]:
    return usage_dict(len(job.prompt_ids), len(job.output_ids), job.num_cached_tokens or 0)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _chat_chunk(
    job: _Job, created: int, delta: dict[str, Any], choice: dict[str, Any] | None
) -> dict[str, Any]:
    out: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
    if choice is not None:
        out["finish_reason"] = choice.get("finish_reason")
        if choice.get("finish_reason") is not None:
            out["stop_reason"] = choice.get("stop_reason")
        out["token_ids"] = choice.get("token_ids")
        if choice.get("logprobs"):
            out["logprobs"] = {"content": _chat_logprobs([choice["logprobs"]])}
    return {
        "id": job.request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": job.model,
        "choices": [out],
    }


def _stream_chunk(job: _Job, created: int, choice: dict[str, Any], chat: bool) -> dict[str, Any]:
    if chat:
        text = choice.get("text") or ""
        return _chat_chunk(job, created, {"content": text} if text else {}, choice)
    out = {
        "index": 0,
        "text": choice.get("text") or "",
        "logprobs": choice.get("logprobs"),
        "finish_reason": choice.get("finish_reason"),
        "stop_reason": choice.get("stop_reason"),
        "token_ids": choice.get("token_ids"),
    }
    return {
        "id": job.request_id,
        "object": "text_completion",
        "created": created,
        "model": job.model,
        "choices": [out],
    }


def _merge_completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    for part in parts:
        for key in merged:
            merged[key].extend(part.get(key) or [])
    return {**merged, "text_offset": []}


def _chat_logprobs(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged = _merge_completion_logprobs(parts)
    content = []
    for token, logprob, top in zip(
        merged["tokens"], merged["token_logprobs"], merged["top_logprobs"], strict=False
    ):
        content.append(
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(t.encode())}
                    for t, v in (top or {}).items()
                ],
            }
        )
    return content


def _full_response(
    job: _Job, text: str, logprobs: list[dict[str, Any]], chat: bool
) -> dict[str, Any]:
    common = {"finish_reason": job.finish_reason, "stop_reason": job.stop_reason,
              "token_ids": job.output_ids}  # fmt: skip
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": {"content": _chat_logprobs(logprobs)} if job.logprobs is not None else None,
            **common,
        }
        obj = "chat.completion"
    else:
        prompt = job.body.prompt if isinstance(job.body, CompletionRequest) else None
        if isinstance(job.body, CompletionRequest) and job.body.echo and isinstance(prompt, str):
            text = prompt + text
        choice = {
            "index": 0,
            "text": text,
            "logprobs": _merge_completion_logprobs(logprobs) if job.logprobs is not None else None,
            **common,
        }
        obj = "text_completion"
    return {
        "id": job.request_id,
        "object": obj,
        "created": now_s(),
        "model": job.model,
        "choices": [choice],
        "usage": _usage(job),
        "kv_transfer_params": None,
    }


# -- background --------------------------------------------------------------------------------


async def _health_loop(state: FrontendState) -> None:
    settings = state.settings
    while True:
        await asyncio.sleep(settings.health_interval_s)
        assert state.pool is not None
        with contextlib.suppress(Exception):
            await state.pool.check_health(settings.max_health_failures)
        _check_kv_events(state)
        write_prometheus_targets(state)


def _check_kv_events(state: FrontendState) -> None:
    """Loud warning when kv routing is asked for but a worker publishes no events."""
    if state.router.policy_name != "kv" or state.pool is None:
        return
    now = time.monotonic()
    silent = 0
    for worker in state.pool.workers.values():
        if worker.num_event_batches > 0 or worker.first_request_s is None:
            continue
        if now - worker.first_request_s < state.settings.kv_events_grace_s:
            continue
        silent += 1
        if not worker.warned_no_events:
            worker.warned_no_events = True
            logger.warning(
                "!!! --router kv, but worker %s (%s) has published no KV events: routing to it "
                "is blind to its cache. Start it with a KV-events publisher (strata worker "
                "--kv-events-port, vllm serve --kv-events-config ...) or use --router approx.",
                worker.worker_id,
                worker.url,
            )
    state.metrics.workers_without_events.set(silent)


def write_prometheus_targets(state: FrontendState) -> None:
    """File service discovery for Prometheus: the frontend and every registered worker."""
    path = state.settings.prometheus_targets_file
    if path is None or state.pool is None:
        return
    groups: list[dict[str, Any]] = []
    if state.settings.self_address:
        groups.append({"targets": [state.settings.self_address],
                       "labels": {"component": "frontend"}})  # fmt: skip
    for worker in state.pool.workers.values():
        address = urlsplit(worker.url).netloc
        groups.append(
            {"targets": [address], "labels": {"component": "worker", "worker": worker.worker_id}}
        )
    text = json.dumps(groups, indent=1)
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: Prometheus never reads half a file


def _refresh_gauges(state: FrontendState) -> None:
    if state.pool is None:
        return
    for worker in state.pool.workers.values():
        if worker.subscriber is None:
            continue
        lost = worker.subscriber.num_lost_batches
        if lost > worker.num_lost_batches:
            state.metrics.kv_event_gaps.labels(worker=worker.worker_id).inc(
                lost - worker.num_lost_batches
            )
            worker.num_lost_batches = lost
    healthy = len(state.pool.healthy_ids())
    state.metrics.workers.labels(state="healthy").set(healthy)
    state.metrics.workers.labels(state="unhealthy").set(len(state.pool.workers) - healthy)


def _worker_json(worker: Worker) -> dict[str, Any]:
    return {
        "worker_id": worker.worker_id,
        "url": worker.url,
        "model": worker.model_name,
        "role": worker.role,
        "healthy": worker.healthy,
        "kv_events_endpoint": worker.kv_events_endpoint,
        "replay_endpoint": worker.replay_endpoint,
        "num_event_batches": worker.num_event_batches,
    }
