"""The worker's HTTP edge: OpenAI-compatible API over one ``AsyncEngine``.

Everything protocol-shaped lives in ``serving.protocol.openai``; this module validates a request
against the model (name, context length, token ids), turns it into an engine ``Request``, and
renders outputs as JSON or SSE. Errors become OpenAI error JSON only here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.engine.factory import ModelInfo
from serving.engine.kv_transfer import KVLease, RemotePrefill, wants_remote_decode
from serving.engine.output_processor import RequestOutput
from serving.engine.request import Request as EngineRequest
from serving.engine.scheduler_output import TokenLogprobs
from serving.engine.tokenizer import encode_chat, encode_prompt
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
from serving.worker.engine_loop import AsyncEngine, EngineDeadError

logger = logging.getLogger(__name__)

# OpenAI's documented default for the legacy completions endpoint.
_COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# What the generation routes answer, for the OpenAPI spec (tests/frontend/test_openapi_fuzz.py).
_CMPL_DOCS = {**completion_responses(CompletionResponse), **error_responses(404, 503)}
_CHAT_DOCS = {**completion_responses(ChatCompletionResponse), **error_responses(404, 503)}


@dataclass(slots=True)
class WorkerState:
    engine: AsyncEngine
    info: ModelInfo
    tokenizer: Any | None
    served_model_names: list[str]
    draining: bool = False
    extra_health: dict[str, Any] = field(default_factory=dict)


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
            return await _sse(_completion_stream(state, body, request))
        return JSONResponse(await _completion_response(state, body, request))

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
            return await _sse(_chat_stream(state, body, request))
        return JSONResponse(await _chat_response(state, body, request))

    return app


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


def _response_kv_params(state: WorkerState, last: RequestOutput) -> dict[str, Any] | None:
    """Filled ``kv_transfer_params`` when the engine leased the blocks for a decode pull."""
    connector = state.engine.connector
    if last.kv_transfer_params is None or connector is None:
        return None
    if not last.kv_transfer_params.get("do_remote_prefill"):
        return None  # a request's own params echoed back, not a lease
    return connector.response_params(last.kv_transfer_params)


# -- running ------------------------------------------------------------------------------------


async def _run(
    state: WorkerState, request: EngineRequest, include_stop: bool
) -> AsyncIterator[RequestOutput]:
    try:
        async for out in state.engine.generate(request, include_stop_str_in_output=include_stop):
            yield out
    except EngineDeadError as exc:
        raise APIError(str(exc), status_code=500, type="InternalServerError") from exc
    except ValueError as exc:  # rejected by the engine (prompt cannot fit)
        raise APIError(str(exc), param="prompt") from exc


_JSON = msgspec.json.Encoder()


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """SSE response. The first chunk is awaited before the headers go out, so a request the
    engine rejects still gets its status code; later errors are sent as an error event."""
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = None

    async def body() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield _sse_data(first)
            async for chunk in chunks:
                yield _sse_data(chunk)
        except APIError as exc:
            yield _sse_data(exc.to_dict())
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def _sse_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + _JSON.encode(payload) + b"\n\n"


async def _collect(
    state: WorkerState, request: EngineRequest, include_stop: bool
) -> tuple[str, list[int], list[TokenLogprobs], RequestOutput]:
    text: list[str] = []
    token_ids: list[int] = []
    logprobs: list[TokenLogprobs] = []
    last: RequestOutput | None = None
    async for out in _run(state, request, include_stop):
        text.append(out.text)
        token_ids.extend(out.token_ids)
        logprobs.extend(out.logprobs)
        last = out
    assert last is not None
    return "".join(text), token_ids, logprobs, last


# -- completions ------------------------------------------------------------------------------


async def _completion_response(
    state: WorkerState, body: CompletionRequest, request: EngineRequest
) -> dict[str, Any]:
    text, token_ids, logprobs, last = await _collect(
        state, request, body.include_stop_str_in_output
    )
    if body.echo and isinstance(body.prompt, str):
        text = body.prompt + text
    choice: dict[str, Any] = {
        "index": 0,
        "text": text,
        "logprobs": _completion_logprobs(state, logprobs) if body.logprobs is not None else None,
        "finish_reason": last.finish_reason,
        "stop_reason": last.stop_reason,
        "token_ids": token_ids,
    }
    return {
        "id": request.request_id,
        "object": "text_completion",
        "created": now_s(),
        "model": body.model,
        "choices": [choice],
        "usage": usage_dict(last.num_prompt_tokens, last.num_output_tokens, last.num_cached_tokens),
        "kv_transfer_params": _response_kv_params(state, last),
    }


async def _completion_stream(
    state: WorkerState, body: CompletionRequest, request: EngineRequest
) -> AsyncIterator[dict[str, Any]]:
    created = now_s()
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    last: RequestOutput | None = None
    async for out in _run(state, request, body.include_stop_str_in_output):
        last = out
        if not out.text and not out.token_ids and not out.finished:
            continue
        yield {
            "id": request.request_id,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "text": out.text,
                    "logprobs": _completion_logprobs(state, out.logprobs)
                    if body.logprobs is not None
                    else None,
                    "finish_reason": out.finish_reason,
                    "stop_reason": out.stop_reason,
                    "token_ids": out.token_ids,
                }
            ],
        }
    if include_usage and last is not None:
        yield {
            "id": request.request_id,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": [],
            "usage": usage_dict(
                last.num_prompt_tokens, last.num_output_tokens, last.num_cached_tokens
            ),
        }


# -- chat ---------------------------------------------------------------------------------------


async def _chat_response(
    state: WorkerState, body: ChatCompletionRequest, request: EngineRequest
) -> dict[str, Any]:
    text, token_ids, logprobs, last = await _collect(
        state, request, body.include_stop_str_in_output
    )
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text, "tool_calls": []},
        "logprobs": {"content": _chat_logprobs(state, logprobs)} if body.logprobs else None,
        "finish_reason": last.finish_reason,
        "stop_reason": last.stop_reason,
        "token_ids": token_ids,
    }
    return {
        "id": request.request_id,
        "object": "chat.completion",
        "created": now_s(),
        "model": body.model,
        "choices": [choice],
        "usage": usage_dict(last.num_prompt_tokens, last.num_output_tokens, last.num_cached_tokens),
        "kv_transfer_params": _response_kv_params(state, last),
    }


async def _chat_stream(
    state: WorkerState, body: ChatCompletionRequest, request: EngineRequest
) -> AsyncIterator[dict[str, Any]]:
    created = now_s()
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None, **extra}
        return {
            "id": request.request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [choice],
        }

    stream = _run(state, request, body.include_stop_str_in_output)
    last: RequestOutput | None = None
    first = True
    async for out in stream:
        if first:
            yield chunk({"role": "assistant", "content": ""})
            first = False
        last = out
        if not out.text and not out.token_ids and not out.finished:
            continue
        extra: dict[str, Any] = {"token_ids": out.token_ids}
        if body.logprobs:
            extra["logprobs"] = {"content": _chat_logprobs(state, out.logprobs)}
        if out.finished:
            extra["finish_reason"] = out.finish_reason
            extra["stop_reason"] = out.stop_reason
        yield chunk({"content": out.text} if out.text else {}, **extra)
    if include_usage and last is not None:
        yield {
            "id": request.request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [],
            "usage": usage_dict(
                last.num_prompt_tokens, last.num_output_tokens, last.num_cached_tokens
            ),
        }


# -- logprobs -----------------------------------------------------------------------------------


def _token_text(state: WorkerState, token_id: int) -> str:
    if state.tokenizer is None:
        return f"token_id:{token_id}"
    return state.tokenizer.convert_ids_to_tokens(token_id) or ""


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -9999.0


def _chat_logprobs(state: WorkerState, logprobs: list[TokenLogprobs]) -> list[dict[str, Any]]:
    entries = []
    for lp in logprobs:
        token = _token_text(state, lp.token_id)
        entries.append(
            {
                "token": token,
                "logprob": _finite(lp.logprob),
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {
                        "token": _token_text(state, t),
                        "logprob": _finite(v),
                        "bytes": list(_token_text(state, t).encode()),
                    }
                    for t, v in zip(lp.top_token_ids, lp.top_logprobs, strict=True)
                ],
            }
        )
    return entries


def _completion_logprobs(state: WorkerState, logprobs: list[TokenLogprobs]) -> dict[str, Any]:
    return {
        "tokens": [_token_text(state, lp.token_id) for lp in logprobs],
        "token_logprobs": [_finite(lp.logprob) for lp in logprobs],
        "top_logprobs": [
            {
                _token_text(state, t): _finite(v)
                for t, v in zip(lp.top_token_ids, lp.top_logprobs, strict=True)
            }
            for lp in logprobs
        ],
        "text_offset": [],
    }
