"""What the frontend and the workers really answer, for their OpenAPI specs (``responses=``).

Response bodies as pydantic models (documentation only: the servers build plain dicts), every
error status with the OpenAI error body, SSE streams as ``text/event-stream`` and ``/metrics``
as Prometheus text. The fuzz tests (``tests/frontend/test_openapi_fuzz.py``) hold the servers
to these specs.
"""

from __future__ import annotations

from typing import Any, Literal

from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict

PROMETHEUS_TEXT = CONTENT_TYPE_LATEST  # what prometheus_client serves


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorBody(_Open):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error JSON."""

    error: ErrorBody


class PromptTokensDetails(_Open):
    cached_tokens: int


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionChoice(_Open):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class CompletionResponse(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    kv_transfer_params: dict[str, Any] | None = None


class ChatMessageOut(_Open):
    role: Literal["assistant"]
    content: str | None = None
    tool_calls: list[Any] = []


class ChatChoice(_Open):
    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelCard]


class HealthStatus(_Open):
    status: str


class Readiness(_Open):
    status: Literal["ready", "not ready"]
    reasons: list[str]


_ERROR_TEXT = {
    400: "Invalid request (OpenAI error JSON; `param` names the field).",
    401: "Missing or unknown API key.",
    403: "The key may not call this API (an inference key on /admin, an admin key on /v1).",
    404: "Unknown model, route or object.",
    405: "Method not allowed on this path.",
    413: "Request body over the size limit.",
    429: "Over a limit: in-flight requests, queued prompt tokens or the key's rate. "
    "`Retry-After` gives the seconds to wait.",
    503: "No healthy worker, or the worker failed beyond the migration limit.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for error statuses, each an OpenAI error body."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": _ERROR_TEXT[code]}
        if code == 429:
            entry["headers"] = {
                "Retry-After": {
                    "description": "Seconds after which a retry can succeed.",
                    "schema": {"type": "integer", "minimum": 1},
                }
            }
        out[code] = entry
    return out


def completion_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """200 as JSON (``model``) or, with ``stream: true``, as server-sent events."""
    return {
        200: {
            "model": model,
            "description": "The completion; with `stream: true` a `text/event-stream` of "
            "`data: {chunk}` lines ending with `data: [DONE]`.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    }


METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition format.",
        "content": {PROMETHEUS_TEXT: {"schema": {"type": "string"}}},
    }
}


def drop_validation_422(app: Any) -> None:
    """FastAPI documents a 422 on every route with parameters; Strata's handlers answer 400
    (OpenAI's status for a bad request) instead, so the 422 entries are removed."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
