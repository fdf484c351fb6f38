"""The worker's HTTP edge: OpenAI-compatible API over one ``AsyncEngine``.

Everything protocol-shaped lives in ``serving.protocol.openai``; this module validates a request
against the model (name, context length, token ids) and turns it into an engine ``Request``;
``serving.worker.render`` renders the outputs as JSON or SSE. Errors become OpenAI error JSON
only here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.engine.kv_transfer import KVLease, RemotePrefill, wants_remote_decode
from serving.engine.request import Request as EngineRequest
from serving.engine.tokenizer import encode_chat, encode_prompt
from serving.protocol.openai import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    check_prompt,
    model_card,
    model_not_found,
    new_id,
)
from serving.protocol.openapi_docs import (
    METRICS_RESPONSES,
    ChatCompletionResponse,
    CompletionResponse,
    HealthStatus,
    ModelList,
    completion_responses,
    drop_validation_422,
    error_responses,
)
from serving.worker.render import (
    chat_response,
    chat_stream,
    completion_response,
    completion_stream,
    sse,
)
from serving.worker.state import WorkerState

logger = logging.getLogger(__name__)

# OpenAI's documented default for the legacy completions endpoint.
_COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# What the generation routes answer, for the OpenAPI spec (tests/frontend/test_openapi_fuzz.py).
_CMPL_DOCS = {**completion_responses(CompletionResponse), **error_responses(404, 503)}
_CHAT_DOCS = {**completion_responses(ChatCompletionResponse), **error_responses(404, 503)}


def create_app(state: WorkerState, on_shutdown: Callable[[], Any] | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        try:
            yield
        finally:
            await state.engine.shutdown()
            if on_shutdown is not None:
                on_shutdown()

    app = FastAPI(title="Strata worker", lifespan=lifespan, responses=error_responses(400))
    app.state.worker = state
    drop_validation_422(app)
    _add_error_handlers(app)
    _add_status_routes(app, state)
    _add_lease_routes(app, state)
    _add_openai_routes(app, state)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI error JSON: API errors, 400 for validation, 404/405."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error(exc).to_dict(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
        error = APIError(str(exc.detail), status_code=exc.status_code, type=kind)
        return JSONResponse(error.to_dict(), status_code=exc.status_code, headers=exc.headers)


def _add_status_routes(app: FastAPI, state: WorkerState) -> None:
    @app.get("/health", responses={200: {"model": HealthStatus}, 503: {"model": HealthStatus}})
    async def health() -> JSONResponse:
        if not state.engine.is_alive:
            return JSONResponse({"status": "dead"}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", **state.extra_health})

    @app.get("/metrics", response_class=Response, responses=METRICS_RESPONSES)
    async def metrics() -> Response:
        registry = state.engine.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _add_lease_routes(app: FastAPI, state: WorkerState) -> None:
    """The prefill role's KV leases: list, renew, release."""

    @app.get("/v1/kv/leases")
    async def leases() -> dict[str, Any]:
        """Finished prefill requests whose blocks wait for a decode worker (prefill role)."""
        now = state.engine.core.clock()
        return {
            "leases": [_lease_dict(lease, now) for lease in state.engine.leases_snapshot],
            "kv_transport": state.extra_health.get("kv_transport"),
        }

    @app.post("/v1/kv/leases/{request_id}/renew", responses=error_responses(404))
    async def renew_lease(request_id: str, raw: Request) -> dict[str, Any]:
        """Push a lease's expiry out (body ``{"lease_s": s}`` optional: the default lease)."""
        lease_s = None
        if await raw.body():
            try:
                lease_s = float((await raw.json())["lease_s"])
            except (ValueError, KeyError, TypeError) as exc:
                raise APIError('body must be {"lease_s": seconds}', param="lease_s") from exc
            if not lease_s > 0:
                raise APIError("lease_s must be > 0", param="lease_s")
        lease = await state.engine.lease_op(request_id, lease_s=lease_s)
        if lease is None:
            raise _lease_not_found(request_id)
        return _lease_dict(lease, state.engine.core.clock())

    @app.delete("/v1/kv/leases/{request_id}", status_code=204, responses=error_responses(404))
    async def release_lease(request_id: str) -> Response:
        """Free a lease's blocks now (the decode side gave up; also done by notification)."""
        if not await state.engine.lease_op(request_id, release=True):
            raise _lease_not_found(request_id)
        return Response(status_code=204)


def _add_openai_routes(app: FastAPI, state: WorkerState) -> None:
    @app.get("/v1/models", response_model=ModelList)
    async def models() -> dict[str, Any]:
        cards = [model_card(n, state.info.max_model_len) for n in state.served_model_names]
        return {"object": "list", "data": cards}

    @app.post("/v1/completions", response_model=None, responses=_CMPL_DOCS)
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        _check_model(state, body.model)
        if isinstance(body.prompt, str):
            if state.tokenizer is None:
                raise APIError("this worker has no tokenizer: send token ids", param="prompt")
            prompt_ids = encode_prompt(state.tokenizer, body.prompt)
        else:
            prompt_ids = list(body.prompt)
        request = _engine_request(
            state,
            body,
            prompt_ids,
            request_id=_request_id(raw, "cmpl"),
            max_tokens=body.max_tokens,
            default_max_tokens=_COMPLETIONS_DEFAULT_MAX_TOKENS,
            logprobs=body.logprobs,
        )
        if body.stream:
            return await sse(completion_stream(state, body, request))
        return JSONResponse(await completion_response(state, body, request))

    @app.post("/v1/chat/completions", response_model=None, responses=_CHAT_DOCS)
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        _check_model(state, body.model)
        if state.tokenizer is None:
            raise APIError("this worker has no tokenizer: use /v1/completions with token ids")
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
        request = _engine_request(
            state,
            body,
            prompt_ids,
            request_id=_request_id(raw, "chatcmpl"),
            max_tokens=body.effective_max_tokens,
            default_max_tokens=None,
            logprobs=body.num_logprobs,
        )
        if body.stream:
            return await sse(chat_stream(state, body, request))
        return JSONResponse(await chat_response(state, body, request))


# -- request building ---------------------------------------------------------------------------


def _lease_dict(lease: KVLease, now_s: float) -> dict[str, Any]:
    return {
        "request_id": lease.request_id,
        "block_ids": list(lease.block_ids),
        "num_tokens": lease.num_tokens,
        "expires_in_s": round(lease.expires_at_s - now_s, 3),
    }


def _lease_not_found(request_id: str) -> APIError:
    return APIError(
        f"no KV lease for request {request_id!r} (pulled, released or expired)",
        status_code=404,
        type="NotFoundError",
        param="request_id",
    )


def validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return APIError(f"request body is not valid JSON: {message}")
    return APIError(f"{param}: {message}" if param else message, param=param)


def _check_model(state: WorkerState, model: str) -> None:
    if model not in state.served_model_names:
        raise model_not_found(model)


def _request_id(raw: Request, prefix: str) -> str:
    header = raw.headers.get("x-request-id")
    return f"{prefix}-{header}" if header else new_id(prefix)


def _engine_request(
    state: WorkerState,
    body: ChatCompletionRequest | CompletionRequest,
    prompt_ids: list[int],
    *,
    request_id: str,
    max_tokens: int | None,
    default_max_tokens: int | None,
    logprobs: int | None,
) -> EngineRequest:
    info = state.info
    effective_max_tokens = check_prompt(
        prompt_ids,
        vocab_size=info.vocab_size,
        max_model_len=info.max_model_len,
        max_tokens=max_tokens,
        default_max_tokens=default_max_tokens,
    )
    eos_ids = info.eos_token_ids
    extra_stop_ids = [] if body.ignore_eos else list(eos_ids[1:])
    try:
        params = body.sampling_params(
            default_max_tokens=effective_max_tokens,
            logprobs=logprobs,
            stop_token_ids=extra_stop_ids,
        )
    except ValueError as exc:
        raise APIError(str(exc)) from exc
    return EngineRequest(
        request_id=request_id,
        prompt_token_ids=prompt_ids,
        sampling_params=params,
        eos_token_id=eos_ids[0] if eos_ids else None,
        kv_transfer_params=_request_kv_params(state, body.kv_transfer_params),
    )


def _request_kv_params(state: WorkerState, params: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validate ``kv_transfer_params`` at the edge (400 naming the field).

    Without a KV transport a prefill request is served as a plain one (no lease nobody could
    pull), as a vLLM worker without a connector ignores the field.
    """
    if params is None:
        return None
    try:
        RemotePrefill.from_params(params)
    except ValueError as exc:
        raise APIError(str(exc), param="kv_transfer_params") from exc
    if wants_remote_decode(params) and state.engine.connector is None:
        return None
    return params
