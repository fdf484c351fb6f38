"""``bench.load.stream_completion``: one gap per token after the first, however chunks merge."""

from __future__ import annotations

import asyncio
import json

import httpx

from bench.load import stream_completion
from bench.trace import TraceRequest


def _sse(chunks: list[list[int]]) -> bytes:
    """A completions stream whose chunks carry these token ids, then usage and [DONE]."""
    events = [
        {"choices": [{"index": 0, "text": "x" * len(ids), "token_ids": ids}]} for ids in chunks
    ]
    events.append({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 7}})
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    return body.encode()


def _run(chunks: list[list[int]]):
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=_sse(chunks)))

    async def go():
        async with httpx.AsyncClient(transport=transport, base_url="http://w/v1/") as client:
            request = TraceRequest(index=0, arrival_s=0.0, input_length=4, output_length=7,
                                   hash_ids=())  # fmt: skip
            return await stream_completion(client, "m", request, [1, 2, 3, 4], 0.0)

    return asyncio.run(go())


def test_merged_first_chunk_keeps_one_gap_per_token() -> None:
    # the worker merged the first three tokens (a slow reader), then two chunks of two
    result = _run([[1, 2, 3], [4, 5], [6, 7]])
    assert result.ok and result.output_tokens == 7
    assert len(result.itl_s) == 6
    assert result.itl_s[:2] == [0.0, 0.0]  # arrived with the first token
    assert result.itl_s[2] == result.itl_s[3] and result.itl_s[4] == result.itl_s[5]


def test_one_token_per_chunk_has_no_zero_gaps_added() -> None:
    result = _run([[i] for i in range(7)])
    assert result.output_tokens == 7 and len(result.itl_s) == 6
