"""Server-sent events between workers and the frontend: split, decode, merge, encode. Pure.

A worker's stream is read a network chunk at a time; ``SSEDecoder.feed`` returns the ``data:``
payloads that chunk completes. What one chunk carries reaches the client as one piece
(``merge_choices``): a worker that is ahead of the frontend costs one client write per read,
not one per token, and nothing waits to be merged.
"""

from __future__ import annotations

from typing import Any

import msgspec

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()
DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"


class SSEDecoder:
    """Splits a byte stream into the payloads of its ``data:`` lines (other fields ignored)."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._tail:
            chunk = self._tail + chunk
        lines = chunk.split(b"\n")
        self._tail = lines.pop()  # the incomplete last line (b"" after a newline)
        return [line[6:].rstrip(b"\r") for line in lines if line.startswith(b"data: ")]


def decode(data: bytes) -> Any:
    return _DECODER.decode(data)


def encode_event(payload: Any) -> bytes:
    """One SSE event: ``data: <json>`` and a blank line."""
    return b"data: " + _ENCODER.encode(payload) + b"\n\n"


def encode_json(payload: Any) -> bytes:
    return _ENCODER.encode(payload)


def merge_choices(choices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive completion choices as one (text and token ids joined; finish reason, stop
    reason from the last). Choices with logprobs stay apart (their layout is per token)."""
    if len(choices) < 2 or any(c.get("logprobs") for c in choices):
        return choices
    token_ids: list[int] = []
    for choice in choices:
        token_ids += choice.get("token_ids") or []
    merged = dict(choices[-1])
    merged["text"] = "".join(c.get("text") or "" for c in choices)
    merged["token_ids"] = token_ids
    return [merged]
