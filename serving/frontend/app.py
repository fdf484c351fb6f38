"""The frontend's HTTP app: one OpenAI endpoint over many workers.

Routes, authentication, error mapping and the lifespan (worker pool, health loop) live here;
a request's path is ``job`` (parse and validate) -> ``responses`` (JSON or SSE) ->
``streaming`` (routing, migration, worker streams) with ``prefill`` for disaggregation;
``admin`` holds the control API, ``health`` the background upkeep.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.engine.tokenizer import encode_chat, encode_prompt
from serving.frontend.admin import make_admin_router
from serving.frontend.health import health_loop, refresh_gauges, write_prometheus_targets
from serving.frontend.job import COMPLETIONS_DEFAULT_MAX_TOKENS, Job, make_job
from serving.frontend.models import ServedModel, make_http_client, register_all
from serving.frontend.responses import respond
from serving.frontend.state import FrontendSettings, FrontendState
from serving.protocol.openai import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    model_card,
)
from serving.worker.app import validation_error

__all__ = ["FrontendSettings", "FrontendState", "create_frontend_app", "write_prometheus_targets"]


def create_frontend_app(state: FrontendState) -> FastAPI:
    settings = state.settings
    metrics = state.metrics
    for name in state.models.names:
        metrics.add_model(name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.http = state.models.http = make_http_client()
        await register_all(state.models, state.initial_workers)
        write_prometheus_targets(state)
        state.background.append(asyncio.create_task(health_loop(state)))
        try:
            yield
        finally:
            if settings.prometheus_targets_file is not None:
                settings.prometheus_targets_file.unlink(missing_ok=True)
            for task in state.background:
                task.cancel()
            state.models.close()
            await state.http.aclose()

    app = FastAPI(title="Strata frontend", lifespan=lifespan)
    app.state.frontend = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.requests.labels(
            model=_model_label(request), endpoint=request.url.path, status=str(exc.status_code)
        ).inc()
        return JSONResponse(exc.to_dict(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.requests.labels(
            model=_model_label(request), endpoint=request.url.path, status="400"
        ).inc()
        return JSONResponse(validation_error(exc).to_dict(), status_code=400)

    def _model_label(request: Request) -> str:
        """The served model a failed request named, else "" (bounded: unknown names too)."""
        name = getattr(request.state, "model", None)
        return name if name in state.models.models else ""

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
        healthy = state.models.healthy_ids()
        status = 200 if healthy else 503
        return JSONResponse(
            {"status": "ok" if healthy else "no healthy workers", "workers": len(healthy)},
            status_code=status,
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        refresh_gauges(state)
        body = b"".join(generate_latest(r) for r in [metrics.registry, *state.extra_registries])
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cards = [model_card(m.name, m.max_model_len) for m in state.models.models.values()]
        return {"object": "list", "data": cards}

    app.include_router(make_admin_router())

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        raw.state.model = body.model
        served = state.models.get(body.model)
        if isinstance(body.prompt, str):
            prompt_ids = encode_prompt(served.tokenizer, body.prompt)
        else:
            prompt_ids = list(body.prompt)
        job = _job(served, body, prompt_ids, raw, "cmpl", body.max_tokens,
                   COMPLETIONS_DEFAULT_MAX_TOKENS, body.logprobs)  # fmt: skip
        return await respond(state, served, job, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        raw.state.model = body.model
        served = state.models.get(body.model)
        try:
            messages = [m.for_template() for m in body.messages]
            prompt_ids = encode_chat(
                served.tokenizer,
                messages,
                add_generation_prompt=body.add_generation_prompt,
                chat_template_kwargs=body.chat_template_kwargs,
            )
        except ValueError as exc:
            raise APIError(str(exc), param="messages") from exc
        job = _job(served, body, prompt_ids, raw, "chatcmpl", body.effective_max_tokens,
                   None, body.num_logprobs)  # fmt: skip
        return await respond(state, served, job, chat=True)

    return app


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
