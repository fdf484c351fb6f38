"""The data path's HTTP client to workers: one aiohttp session per frontend process.

Token streams from workers are the frontend's hottest I/O: aiohttp's C-accelerated parser and
its plain ``content.iter_any()`` reads cost less per request than httpx over httpcore (28% of
the frontend's samples under load went to that stack). The control plane (health probes,
registration, prefill calls) keeps the shared ``httpx`` client: it is not per token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

import aiohttp

from serving.frontend.worker_errors import WorkerFailed

_JSON_HEADERS = {"Content-Type": "application/json"}
# Idle connections to a worker stay open this long: less than the 5 s after which vLLM's server
# (uvicorn's default) closes an idle one, so the frontend, not the worker, ends a connection.
# Strata's own workers keep theirs 75 s.
WORKER_KEEPALIVE_S = 4.0
_CONNECT_TIMEOUT_S = 5.0


class WorkerStream:
    """A worker's answer to one streamed request: its status, then its body a read at a time."""

    __slots__ = ("_response", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status

    async def read(self) -> bytes:
        """The whole body (an error answer)."""
        return await self._response.read()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, one network read per chunk (no waiting to fill a buffer)."""
        async for chunk in self._response.content.iter_any():
            yield chunk


class WorkerClient:
    """Owns the connection pool to workers; opens token streams. Every transport failure
    (refused, reset, cut mid-body, connect timeout) surfaces as ``WorkerFailed``."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _session_now(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop (aiohttp binds a session to it).
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=1000, keepalive_timeout=WORKER_KEEPALIVE_S,
                                             ttl_dns_cache=None, use_dns_cache=False)  # fmt: skip
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=_CONNECT_TIMEOUT_S)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                                  auto_decompress=False)  # fmt: skip
        return self._session

    @asynccontextmanager
    async def stream(self, url: str, body: bytes) -> AsyncIterator[WorkerStream]:
        """POST ``body`` (JSON) to ``url`` and hold the response open while the caller reads."""
        try:
            async with AsyncExitStack() as stack:
                yield WorkerStream(await self._open(stack, url, body))
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise WorkerFailed(f"{type(exc).__name__}: {exc}") from exc

    async def _open(self, stack: AsyncExitStack, url: str, body: bytes) -> aiohttp.ClientResponse:
        """The response's status and headers; once more on a new connection when a pooled one
        was closed under the request before any answer.

        A worker closes an idle connection on its own clock; when this process is busy it may
        not have seen the close yet and send on the dead connection (``ServerDisconnected`` with
        no byte answered, the request never read). A worker that is really gone refuses the
        second try, which fails as before.
        """
        try:
            return await stack.enter_async_context(self._post(url, body))
        except aiohttp.ServerDisconnectedError:
            return await stack.enter_async_context(self._post(url, body))

    def _post(self, url: str, body: bytes) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        return self._session_now().post(url, data=body, headers=_JSON_HEADERS)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
