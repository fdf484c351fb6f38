"""The client side of a request: one JSON body, or an SSE stream whose headers wait for the
first piece (so an error before any token keeps its HTTP status)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import Response, StreamingResponse

from serving.frontend import openai_format as fmt
from serving.frontend.guard import Ticket
from serving.frontend.job import Job
from serving.frontend.models import ServedModel
from serving.frontend.sse import DONE_EVENT, encode_json
from serving.frontend.state import FrontendState
from serving.frontend.streaming import client_pieces
from serving.protocol.openai import APIError, now_s


async def respond(
    state: FrontendState,
    served: ServedModel,
    job: Job,
    *,
    chat: bool,
    ticket: Ticket | None = None,
) -> Response:
    """Serve ``job``; ``ticket`` (its admission) is released at the first token and the end."""
    metrics = state.metrics
    model = job.model
    metrics.active_requests.labels(model=model).inc()
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    pieces = client_pieces(state, served, job)
    if not job.body.stream:
        try:
            texts: list[str] = []
            logprobs: list[dict[str, Any]] = []
            async for choice in pieces:
                if ticket is not None and choice.get("token_ids"):
                    ticket.first_token()
                texts.append(choice.get("text") or "")
                if choice.get("logprobs"):
                    logprobs.append(choice["logprobs"])
        finally:
            metrics.active_requests.labels(model=model).dec()
            _release(ticket, job)
        metrics.requests.labels(model=model, endpoint=endpoint, status="200").inc()
        body = encode_json(fmt.full_response(job, "".join(texts), logprobs, chat))
        return Response(body, media_type="application/json")

    # Streaming: wait for the first piece before sending headers, so errors keep their status.
    try:
        first = await anext(pieces)
    except StopAsyncIteration:
        first = None
    except BaseException:
        metrics.active_requests.labels(model=model).dec()
        _release(ticket, job)
        raise
    if ticket is not None:
        ticket.first_token()

    async def body() -> AsyncIterator[bytes]:
        created = now_s()
        status = "200"
        tail = b""
        try:
            head = b""
            if chat:
                head = fmt.sse(fmt.chat_chunk(job, created, {"role": "assistant", "content": ""},
                                              None))  # fmt: skip
            if first is not None:
                head += fmt.sse(fmt.stream_chunk(job, created, first, chat))
            if head:
                yield head
            async for choice in pieces:
                yield fmt.sse(fmt.stream_chunk(job, created, choice, chat))
            options = job.body.stream_options
            if options is not None and options.include_usage:
                tail = fmt.sse(fmt.usage_chunk(job, created, chat))
        except APIError as exc:
            status = str(exc.status_code)
            tail = fmt.sse(exc.to_dict())
        finally:
            metrics.active_requests.labels(model=model).dec()
            metrics.requests.labels(model=model, endpoint=endpoint, status=status).inc()
            _release(ticket, job)
        yield tail + DONE_EVENT

    return _Stream(body(), media_type="text/event-stream", on_close=lambda: _release(ticket, job))


class _Stream(StreamingResponse):
    """A streaming response that releases the request's admission when the response ends,
    even when the client left before the body started (the body's own ``finally`` never
    runs then)."""

    def __init__(self, content: Any, *, media_type: str, on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type=media_type)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _release(ticket: Ticket | None, job: Job) -> None:
    if ticket is not None:
        ticket.finish(len(job.prompt_ids) + len(job.output_ids))
