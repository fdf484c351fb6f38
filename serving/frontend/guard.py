"""The frontend's gatekeeping at the HTTP edge: request size, keys, admission, and their metrics.

``GuardMiddleware`` (plain ASGI, before routing) refuses oversized bodies (413) and requests
without the right key (401/403), and puts the caller's ``Principal`` in ``request.state``.
``Gate`` admits a parsed request for a model (``admit`` -> ``Ticket``, or ``Overloaded``: 429
with ``Retry-After``) and keeps the keys file current (``reload_keys``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import msgspec

from serving.frontend.admission import KeyCharge, KeyRateLimiter, ModelAdmission, Overloaded
from serving.frontend.auth import AuthError, KeysFileError, KeyStore, Principal, load_keys_file
from serving.frontend.metrics import FrontendMetrics
from serving.protocol.openai import APIError

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Ticket:
    """One admitted request's claims: released at its first token and at its end."""

    __slots__ = ("_charge", "_done", "_gate", "_model", "_name", "_prompt_tokens", "_queued")

    def __init__(self, gate: Gate, name: str, model: ModelAdmission, charge: KeyCharge | None,
                 num_prompt_tokens: int) -> None:  # fmt: skip
        self._gate, self._name, self._model, self._charge = gate, name, model, charge
        self._prompt_tokens = num_prompt_tokens
        self._queued = True
        self._done = False

    def first_token(self) -> None:
        if self._queued:
            self._queued = False
            self._model.first_token(self._prompt_tokens)

    def finish(self, num_used_tokens: int) -> None:
        """The request ended (any way): free its place, settle its key's token charge.
        Idempotent (the stream's end and the response's close both call it)."""
        if self._done:
            return
        self._done = True
        self.first_token()
        self._model.finish()
        if self._charge is not None:
            self._gate.limiter.settle(self._charge, num_used_tokens)
            self._gate.metrics.key_tokens.labels(model=self._name, key=self._charge.key).inc(
                num_used_tokens
            )


class Gate:
    """Admission state of one frontend: per-model limits, per-key windows, the key store."""

    def __init__(
        self,
        keys: KeyStore,
        metrics: FrontendMetrics,
        model_names: list[str],
        *,
        max_inflight_requests: int = 0,
        max_queued_prompt_tokens: int = 0,
        keys_file: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys = keys
        self.metrics = metrics
        self.limiter = KeyRateLimiter()
        self.clock = clock
        self.keys_file = keys_file
        self._keys_file_stamp: tuple[int, int] | None = None
        self._defaults = (max_inflight_requests, max_queued_prompt_tokens)
        self.models = {name: ModelAdmission(*self._defaults) for name in model_names}
        self._apply_model_limits()

    def admit(
        self, principal: Principal, model: str, num_prompt_tokens: int, max_tokens: int
    ) -> Ticket:
        """Admit a request or raise ``Overloaded`` (counted in the metrics either way)."""
        admission = self.models[model]
        try:
            admission.admit(num_prompt_tokens)
        except Overloaded as exc:
            self._count_refusal(model, principal, exc)
            raise
        try:
            charge = self.limiter.admit(
                principal.name, num_prompt_tokens + max_tokens, self.clock(),
                requests_per_minute=principal.requests_per_minute,
                tokens_per_minute=principal.tokens_per_minute,
            )  # fmt: skip
        except Overloaded as exc:
            admission.first_token(num_prompt_tokens)
            admission.finish()
            self._count_refusal(model, principal, exc)
            raise
        if charge is not None:
            self.metrics.key_requests.labels(
                model=model, key=principal.name, outcome="admitted"
            ).inc()
        return Ticket(self, model, admission, charge, num_prompt_tokens)

    def refuse_early(self, principal: Principal, model: str | None) -> None:
        """Raise ``Overloaded`` (counted) for a request that ``admit`` would refuse whatever its
        body holds: the model's in-flight limit is reached, or the key's request window is
        full. Cheap facts only, so the edge asks before parsing or tokenizing anything; an
        unknown model passes (the route answers 404)."""
        admission = self.models.get(model) if model is not None else None
        if admission is None:
            return
        refusal = admission.inflight_refusal() or self.limiter.request_refusal(
            principal.name, self.clock(), requests_per_minute=principal.requests_per_minute
        )
        if refusal is not None:
            self._count_refusal(model, principal, refusal)
            raise refusal

    def _count_refusal(self, model: str, principal: Principal, exc: Overloaded) -> None:
        self.metrics.rejected.labels(model=model, reason=exc.reason).inc()
        if exc.reason.startswith("key_"):
            self.metrics.key_requests.labels(
                model=model, key=principal.name, outcome="rejected"
            ).inc()

    def refresh_gauges(self) -> None:
        for name, admission in self.models.items():
            m = self.metrics
            m.queued_prompt_tokens.labels(model=name).set(admission.num_queued_prompt_tokens)
            m.admission_limit.labels(model=name, limit="inflight_requests").set(
                admission.max_inflight_requests
            )
            m.admission_limit.labels(model=name, limit="queued_prompt_tokens").set(
                admission.max_queued_prompt_tokens
            )
        for role in ("inference", "admin"):
            self.metrics.api_keys.labels(role=role).set(self.keys.count(role))

    def reload_keys(self, *, force: bool = False) -> bool:
        """Re-read the keys file when it changed (or ``force``); True when new keys are in
        use. A bad file keeps the keys in use and logs the error (the message names it)."""
        if self.keys_file is None:
            return False
        try:
            stat = self.keys_file.stat()
        except OSError as exc:
            return self._reload_failed(str(exc))
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._keys_file_stamp and not force:
            return False
        self._keys_file_stamp = stamp
        try:
            loaded = load_keys_file(self.keys_file)
        except KeysFileError as exc:
            return self._reload_failed(str(exc))
        self.keys.replace_file(loaded)
        self.limiter.forget({k.name for k in loaded.keys} | {"api-key", "anonymous"})
        self._apply_model_limits()
        self.metrics.keys_reloads.labels(outcome="ok").inc()
        logger.info("keys file %s loaded: %d keys", self.keys_file, len(loaded.keys))
        return True

    def _reload_failed(self, message: str) -> bool:
        self.metrics.keys_reloads.labels(outcome="error").inc()
        logger.error("keeping the keys in use: %s", message)
        return False

    def _apply_model_limits(self) -> None:
        overrides = self.keys.file.models
        for name, admission in self.models.items():
            inflight, queued = self._defaults
            limits = overrides.get(name)
            if limits is not None and limits.max_inflight_requests is not None:
                inflight = limits.max_inflight_requests
            if limits is not None and limits.max_queued_prompt_tokens is not None:
                queued = limits.max_queued_prompt_tokens
            admission.max_inflight_requests = inflight
            admission.max_queued_prompt_tokens = queued


class GuardMiddleware:
    """ASGI middleware: body size limit, then keys (``/v1`` inference, ``/admin`` admin), then
    the cheap half of admission for the generating routes (``Gate.refuse_early`` on the body's
    ``model``, decoded alone): a request the frontend cannot take is answered 429 before
    validation and tokenization spend CPU on it, which is what an overloaded frontend lacks."""

    def __init__(
        self, app: Any, *, gate: Gate, metrics: FrontendMetrics, max_request_bytes: int
    ) -> None:
        self.app = app
        self.gate = gate
        self.keys = gate.keys
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrival_s = time.perf_counter()
        path: str = scope["path"]
        admin = path.startswith("/admin/") or path == "/admin"
        if not (admin or path.startswith("/v1/")):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            principal = self.keys.authenticate(headers.get("authorization"), admin=admin)
        except AuthError as exc:
            reason = "unauthorized" if exc.status_code == 401 else "forbidden"
            self.metrics.auth_failures.labels(reason=reason).inc()
            error = APIError(exc.message, status_code=exc.status_code,
                             type="authentication_error" if exc.status_code == 401
                             else "permission_error",
                             code="invalid_api_key" if exc.status_code == 401
                             else "insufficient_permissions")  # fmt: skip
            await _send_error(send, error, path, self.metrics)
            return
        state = scope.setdefault("state", {})
        state["principal"], state["arrival_s"] = principal, arrival_s
        body = await self._read_body(headers, receive, send, path)
        if body is None:
            return
        generating = path in GENERATE_ENDPOINTS and scope["method"] == "POST"
        if generating and await self._refused_early(principal, body, path, arrival_s, send):
            return
        await self.app(scope, _replay(body, receive), send)

    async def _refused_early(
        self, principal: Principal, body: bytes, path: str, arrival_s: float, send: Send
    ) -> bool:
        """Answer 429 and return True when the gate refuses the request on cheap facts."""
        model = peek_model(body)
        try:
            self.gate.refuse_early(principal, model)
        except Overloaded as exc:
            assert model is not None
            self.metrics.rejection_seconds.labels(model=model).observe(
                time.perf_counter() - arrival_s
            )
            retry_after = [(b"retry-after", str(exc.retry_after_s).encode())]
            await _send_error(send, exc, path, self.metrics, model=model, headers=retry_after)
            return True
        return False

    async def _read_body(
        self, headers: dict[str, str], receive: Receive, send: Send, path: str
    ) -> bytes | None:
        """The whole request body, or None after answering 413 (over the limit, announced by
        ``content-length`` or found while reading a chunked body)."""
        limit = self.max_request_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._too_large(send, path)
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await self._too_large(send, path)
                return None
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _too_large(self, send: Send, path: str) -> None:
        self.metrics.rejected.labels(model="", reason="request_too_large").inc()
        error = APIError(
            f"request body larger than {self.max_request_bytes} bytes",
            status_code=413,
            code="request_too_large",
        )
        await _send_error(send, error, path, self.metrics)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for the app: the body already read, then the connection's own messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _ModelField(msgspec.Struct):
    model: str


_MODEL_DECODER = msgspec.json.Decoder(_ModelField)


def peek_model(body: bytes) -> str | None:
    """The ``model`` of a JSON request body, decoded alone (other fields are skipped, not
    validated); None when the body has no string ``model`` (the route's validation answers)."""
    try:
        return _MODEL_DECODER.decode(body).model
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def endpoint_label(path: str) -> str:
    """A bounded ``endpoint`` label: the API's paths as they are, anything else grouped."""
    if path in ENDPOINTS:
        return path
    return "/admin" if path.startswith("/admin") else "other"


GENERATE_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions"})
ENDPOINTS = GENERATE_ENDPOINTS | {"/v1/models"}


async def _send_error(
    send: Send,
    error: APIError,
    path: str,
    metrics: FrontendMetrics,
    *,
    model: str = "",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    metrics.requests.labels(
        model=model, endpoint=endpoint_label(path), status=str(error.status_code)
    ).inc()
    body = msgspec.json.encode(error.to_dict())
    await send(
        {
            "type": "http.response.start",
            "status": error.status_code,
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()), *(headers or [])],
        }
    )  # fmt: skip
    await send({"type": "http.response.body", "body": body})
