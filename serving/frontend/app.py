"""The frontend's HTTP app: one OpenAI endpoint over many workers.

Routes, error mapping and the lifespan (workers, health loop, keys watcher) live here; keys,
size limit and admission in ``guard`` (``auth``, ``admission`` are their pure cores);
a request's path is ``job`` (parse and validate) -> ``responses`` (JSON or SSE) ->
``streaming`` (routing, migration, worker streams) with ``prefill`` for disaggregation;
``admin`` holds the control API, ``health`` the background upkeep.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.engine.tokenizer import encode_chat, encode_prompt
from serving.frontend.admin import make_admin_router
from serving.frontend.admission import Overloaded
from serving.frontend.auth import ANONYMOUS, KeyStore, Principal, load_keys_file
from serving.frontend.discovery import Discovery, DiscoverySource, StaticSource
from serving.frontend.discovery.file import FileSource
from serving.frontend.discovery.kubernetes import KubernetesSource
from serving.frontend.guard import Gate, GuardMiddleware, Ticket, endpoint_label
from serving.frontend.health import health_loop, refresh_gauges, write_prometheus_targets
from serving.frontend.job import COMPLETIONS_DEFAULT_MAX_TOKENS, Job, make_job
from serving.frontend.models import ServedModel, make_http_client, register_all
from serving.frontend.responses import respond
from serving.frontend.state import FrontendSettings, FrontendState
from serving.frontend.tokenizing import Tokenizing, prompt_chars
from serving.protocol.openai import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    model_card,
)
from serving.protocol.openapi_docs import (
    METRICS_RESPONSES,
    ChatCompletionResponse,
    CompletionResponse,
    HealthStatus,
    ModelList,
    Readiness,
    completion_responses,
    drop_validation_422,
    error_responses,
)
from serving.worker.app import validation_error

__all__ = ["FrontendSettings", "FrontendState", "create_frontend_app", "write_prometheus_targets"]


def create_frontend_app(state: FrontendState) -> FastAPI:
    settings = state.settings
    metrics = state.metrics
    for name in state.models.names:
        metrics.add_model(name)
    gate = state.gate = state.gate or build_gate(state)
    tokenize = Tokenizing()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.http = state.models.http = make_http_client()
        await register_all(state.models, state.initial_workers)
        if state.initial_workers:  # bring them back after a restart (e.g. the supervisor's)
            static = Discovery(state.models, StaticSource(state.initial_workers))
            state.background.append(asyncio.create_task(static.run()))
        source = state.discovery_source or make_discovery_source(settings)
        if source is not None:
            state.discovery = Discovery(state.models, source)
            state.background.append(asyncio.create_task(state.discovery.run()))
        write_prometheus_targets(state)
        state.background.append(asyncio.create_task(health_loop(state)))
        if settings.keys_file is not None:
            state.background.append(asyncio.create_task(_watch_keys(state)))
        try:
            yield
        finally:
            if settings.prometheus_targets_file is not None:
                settings.prometheus_targets_file.unlink(missing_ok=True)
            for task in state.background:
                task.cancel()
            state.models.close()
            tokenize.close()
            await state.http.aclose()
            await state.workers_client.close()

    app = FastAPI(
        title="Strata frontend",
        description="OpenAI-compatible endpoint over Strata workers; `/admin` is the control API.",
        lifespan=lifespan,
        responses=error_responses(400, 401, 403, 413),
    )
    app.state.frontend = state
    app.add_middleware(GuardMiddleware, gate=gate, metrics=metrics,
                       max_request_bytes=settings.max_request_bytes)  # fmt: skip
    install_error_handlers(app, state)
    drop_validation_422(app)

    @app.get("/health", responses={200: {"model": HealthStatus}, 503: {"model": HealthStatus}})
    async def health() -> JSONResponse:
        """200 while at least one worker is healthy (any model)."""
        healthy = state.models.healthy_ids()
        status = 200 if healthy else 503
        return JSONResponse(
            {"status": "ok" if healthy else "no healthy workers", "workers": len(healthy)},
            status_code=status,
        )

    @app.get("/ready", responses={200: {"model": Readiness}, 503: {"model": Readiness}})
    async def ready() -> JSONResponse:
        """200 once discovery's first sync is applied (workers registered, their KV events
        replayed) and every served model has a healthy worker: the readiness probe."""
        reasons = []
        if state.discovery is not None and not state.discovery.synced.is_set():
            reasons.append(f"{state.discovery.source.name} discovery has not synced yet")
        for model in state.models.models.values():
            if not any(w.healthy for w in model.workers()):
                reasons.append(f"no healthy worker for model {model.name!r}")
        return JSONResponse({"status": "not ready" if reasons else "ready", "reasons": reasons},
                            status_code=503 if reasons else 200)  # fmt: skip

    @app.get("/live", response_model=HealthStatus)
    async def live() -> dict[str, str]:
        """200 while the process serves: the liveness probe (workers do not matter)."""
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response, responses=METRICS_RESPONSES)
    async def prometheus() -> Response:
        refresh_gauges(state)
        gate.refresh_gauges()
        body = b"".join(generate_latest(r) for r in [metrics.registry, *state.extra_registries])
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> dict[str, Any]:
        cards = [model_card(m.name, m.max_model_len) for m in state.models.models.values()]
        return {"object": "list", "data": cards}

    app.include_router(make_admin_router())
    cmpl_docs = {**completion_responses(CompletionResponse), **error_responses(404, 429, 503)}
    chat_docs = {**completion_responses(ChatCompletionResponse), **error_responses(404, 429, 503)}

    @app.post("/v1/completions", response_model=None, responses=cmpl_docs)
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        raw.state.model = body.model
        served = state.models.get(body.model)
        if isinstance(body.prompt, str):
            prompt_ids = await tokenize(
                len(body.prompt), encode_prompt, served.tokenizer, body.prompt
            )
        else:
            prompt_ids = list(body.prompt)
        job = _job(served, body, prompt_ids, raw, "cmpl", body.max_tokens,
                   COMPLETIONS_DEFAULT_MAX_TOKENS, body.logprobs)  # fmt: skip
        ticket = _admit(gate, raw, job)
        return await respond(state, served, job, chat=False, ticket=ticket)

    @app.post("/v1/chat/completions", response_model=None, responses=chat_docs)
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        raw.state.model = body.model
        served = state.models.get(body.model)
        try:
            messages = [m.for_template() for m in body.messages]
            prompt_ids = await tokenize(
                prompt_chars(messages),
                encode_chat,
                served.tokenizer,
                messages,
                add_generation_prompt=body.add_generation_prompt,
                chat_template_kwargs=body.chat_template_kwargs,
            )
        except ValueError as exc:
            raise APIError(str(exc), param="messages") from exc
        job = _job(served, body, prompt_ids, raw, "chatcmpl", body.effective_max_tokens,
                   None, body.num_logprobs)  # fmt: skip
        ticket = _admit(gate, raw, job)
        return await respond(state, served, job, chat=True, ticket=ticket)

    return app


def make_discovery_source(settings: FrontendSettings) -> DiscoverySource | None:
    if settings.discovery == "file":
        if settings.discovery_file is None:
            raise ValueError("--discovery file needs --discovery-file PATH")
        return FileSource(settings.discovery_file)
    if settings.discovery == "kubernetes":
        return KubernetesSource(settings.kube_namespace, settings.kube_selector)
    return None


def build_gate(state: FrontendState) -> Gate:
    """Keys (``--api-key``, ``--admin-key``, the keys file: a bad file raises
    ``KeysFileError``) and admission limits from the settings."""
    settings = state.settings
    keys = KeyStore(settings.api_key, settings.admin_key)
    gate = Gate(
        keys,
        state.metrics,
        state.models.names,
        max_inflight_requests=settings.max_inflight_requests,
        max_queued_prompt_tokens=settings.max_queued_prompt_tokens,
        keys_file=settings.keys_file,
    )
    if settings.keys_file is not None:
        load_keys_file(settings.keys_file)  # fail at start-up, naming the file and field
        gate.reload_keys(force=True)
    return gate


async def _watch_keys(state: FrontendState) -> None:
    """Re-read the keys file when it changes: keys and limits apply without a restart."""
    assert state.gate is not None
    while True:
        await asyncio.sleep(state.settings.keys_reload_interval_s)
        state.gate.reload_keys()


def install_error_handlers(app: FastAPI, state: FrontendState) -> None:
    """Every error as OpenAI JSON with its status (``Retry-After`` on 429), counted."""
    metrics = state.metrics

    def count(request: Request, status: int) -> None:
        name = getattr(request.state, "model", None)
        model = name if name in state.models.models else ""
        endpoint = endpoint_label(request.url.path)
        metrics.requests.labels(model=model, endpoint=endpoint, status=str(status)).inc()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        count(request, exc.status_code)
        headers = None
        if isinstance(exc, Overloaded):
            headers = {"Retry-After": str(exc.retry_after_s)}
            arrival_s = getattr(request.state, "arrival_s", None)
            if arrival_s is not None:
                metrics.rejection_seconds.labels(model=request.state.model).observe(
                    time.perf_counter() - arrival_s
                )
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        count(request, 400)
        return JSONResponse(validation_error(exc).to_dict(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        count(request, exc.status_code)
        kind = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
        error = APIError(str(exc.detail), status_code=exc.status_code, type=kind)
        return JSONResponse(error.to_dict(), status_code=exc.status_code, headers=exc.headers)


def _admit(gate: Gate, raw: Request, job: Job) -> Ticket:
    principal = getattr(raw.state, "principal", None) or Principal(ANONYMOUS, "inference")
    return gate.admit(principal, job.model, len(job.prompt_ids), job.max_tokens)


def _job(
    served: ServedModel,
    body: ChatCompletionRequest | CompletionRequest,
    prompt_ids: list[int],
    raw: Request,
    prefix: str,
    max_tokens: int | None,
    default_max_tokens: int | None,
    logprobs: int | None,
) -> Job:
    return make_job(
        body,
        prompt_ids,
        headers=raw.headers,
        prefix=prefix,
        max_tokens=max_tokens,
        default_max_tokens=default_max_tokens,
        logprobs=logprobs,
        vocab_size=served.vocab_size,
        max_model_len=served.max_model_len,
    )
