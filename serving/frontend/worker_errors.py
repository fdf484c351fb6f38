"""How a worker's failures look to the frontend: migrate (``WorkerFailed``) or tell the client
(a 4xx passed through as ``APIError``)."""

from __future__ import annotations

import msgspec

from serving.protocol.openai import APIError


class WorkerFailed(Exception):
    """The worker's connection broke or it answered 5xx: migrate."""


def passthrough_error(status_code: int, body: bytes) -> APIError:
    """A worker's 4xx answer as the client's error (the request itself is bad)."""
    try:
        error = msgspec.json.decode(body)["error"]
        return APIError(
            error.get("message", "worker rejected the request"),
            status_code=status_code,
            type=error.get("type", "invalid_request_error"),
            param=error.get("param"),
            code=error.get("code"),
        )
    except (msgspec.DecodeError, KeyError, TypeError, AttributeError):
        return APIError(body[:500].decode(errors="replace"), status_code=status_code)
