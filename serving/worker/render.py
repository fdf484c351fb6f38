"""The worker's responses: engine outputs rendered as OpenAI JSON or SSE chunks.

Owns running one engine request to completion or as a stream, and the OpenAI shapes of its
output (choices, usage, logprobs, filled ``kv_transfer_params``). Validation and routing stay
in ``serving.worker.app``; engine errors become ``APIError`` here, and JSON only at the edge.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from fastapi.responses import StreamingResponse

from serving.engine.output_processor import RequestOutput
from serving.engine.request import Request as EngineRequest
from serving.engine.scheduler_output import TokenLogprobs
from serving.protocol.openai import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    now_s,
    usage_dict,
)
from serving.worker.engine_loop import EngineDeadError
from serving.worker.state import WorkerState


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


async def sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
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


async def completion_response(
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


async def completion_stream(
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


async def chat_response(
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


async def chat_stream(
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
