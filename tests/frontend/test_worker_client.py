"""A worker that closes a pooled connection just as the frontend sends on it.

vLLM's server closes a connection idle for 5 s; a busy frontend may not have seen that close
yet and send its next request on the dead connection, which fails before any answer. The
frontend sends such a request once more on a new connection, instead of failing the worker
(a whole request then migrated to another worker, or a decode worker's stream given to the
prefill worker: the CI failure that led to this). A worker that drops every request still fails.

The server here is a raw asyncio HTTP/1.1 server: on each connection it answers the first
request (keep-alive) and closes the connection when a second request comes on it, without
reading or answering it: the race, made deterministic (``drop_all``: every request).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from serving.frontend.prefill import _post as prefill_post
from serving.frontend.worker_client import WorkerClient
from serving.frontend.worker_errors import WorkerFailed

BODY = json.dumps({"ok": True}).encode()


class ClosingServer:
    """Counts what it answered and what it dropped."""

    def __init__(self, drop_all: bool = False) -> None:
        self.drop_all = drop_all
        self.num_answered = 0
        self.num_dropped = 0
        self.num_connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.num_connections += 1
        served_here = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if self.drop_all or served_here:
                    self.num_dropped += 1
                    return  # closed under the request, nothing answered
                length = _content_length(head)
                await reader.readexactly(length)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(BODY)}\r\n\r\n".encode()
                    + BODY
                )
                await writer.drain()
                self.num_answered += 1
                served_here += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


def _content_length(head: bytes) -> int:
    for line in head.decode().split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return int(value)
    return 0


@asynccontextmanager
async def serving(server: ClosingServer) -> AsyncIterator[str]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1/completions"
    finally:
        listener.close()
        await listener.wait_closed()


async def _stream_body(client: WorkerClient, url: str) -> bytes:
    async with client.stream(url, b"{}") as stream:
        assert stream.status == 200
        return b"".join([chunk async for chunk in stream.chunks()])


def test_a_request_on_a_connection_closed_under_it_goes_once_more_on_a_new_one() -> None:
    async def run() -> tuple[list[bytes], ClosingServer]:
        server, client = ClosingServer(), WorkerClient()
        try:
            async with serving(server) as url:
                bodies = [await _stream_body(client, url) for _ in range(3)]
        finally:
            await client.close()
        return bodies, server

    bodies, server = asyncio.run(run())
    assert bodies == [BODY] * 3
    # requests 2 and 3 each went on the pooled connection first, were dropped, went again
    assert (server.num_answered, server.num_dropped, server.num_connections) == (3, 2, 3)


def test_a_worker_that_drops_every_request_fails_after_one_more_try() -> None:
    async def run() -> ClosingServer:
        server, client = ClosingServer(drop_all=True), WorkerClient()
        try:
            async with serving(server) as url:
                with pytest.raises(WorkerFailed, match="ServerDisconnected"):
                    await _stream_body(client, url)
        finally:
            await client.close()
        return server

    server = asyncio.run(run())
    assert (server.num_answered, server.num_dropped) == (0, 2)


def test_the_prefill_call_goes_once_more_on_a_new_connection() -> None:
    async def run() -> tuple[list[dict], ClosingServer]:
        server = ClosingServer()
        async with serving(server) as url, httpx.AsyncClient() as http:
            answers = [(await prefill_post(http, url, {}, {})).json() for _ in range(2)]
        return answers, server

    answers, server = asyncio.run(run())
    assert answers == [{"ok": True}] * 2
    assert (server.num_answered, server.num_dropped) == (2, 1)


def test_a_prefill_worker_that_drops_every_request_is_a_transport_error() -> None:
    async def run() -> ClosingServer:
        server = ClosingServer(drop_all=True)
        async with serving(server) as url, httpx.AsyncClient() as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await prefill_post(http, url, {}, {})
        return server

    assert asyncio.run(run()).num_dropped == 2
