"""Admission control: what the frontend takes, decided at once (no queue without bound).

Per model: requests in flight and prompt tokens queued (admitted, no first token yet), each
with a limit (0: none). Per API key: requests and tokens per minute over a sliding 60 s
window; a request is charged its prompt plus ``max_tokens`` when admitted and settled to the
tokens it really used when it ends. A refusal is an ``Overloaded`` error (HTTP 429) carrying
the seconds after which a retry can succeed (``Retry-After``).

Pure: the caller passes the clock's value (``now_s``); no I/O, no asyncio.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from serving.protocol.openai import APIError

WINDOW_S = 60.0
# Model limits free up when running requests finish: a client should come back soon.
OVERLOAD_RETRY_AFTER_S = 1


class Overloaded(APIError):
    """429 with ``Retry-After``; ``reason`` is the metrics label."""

    def __init__(self, message: str, *, reason: str, retry_after_s: int) -> None:
        super().__init__(message, status_code=429, type="rate_limit_exceeded", code=reason)
        self.reason = reason
        self.retry_after_s = max(1, retry_after_s)


@dataclass(slots=True)
class ModelAdmission:
    """In-flight requests and queued prompt tokens of one served model."""

    max_inflight_requests: int = 0
    max_queued_prompt_tokens: int = 0
    num_inflight: int = 0
    num_queued_prompt_tokens: int = 0

    def inflight_refusal(self) -> Overloaded | None:
        """The refusal of one more request while the in-flight limit is reached, else None:
        asks only, counts nothing (the edge calls it before parsing a body)."""
        if self.max_inflight_requests and self.num_inflight >= self.max_inflight_requests:
            return Overloaded(
                f"too many requests in flight for this model ({self.max_inflight_requests}); "
                "retry later",
                reason="inflight_limit",
                retry_after_s=OVERLOAD_RETRY_AFTER_S,
            )
        return None

    def admit(self, num_prompt_tokens: int) -> None:
        """Count a request in, or raise ``Overloaded``. A single prompt larger than the whole
        token limit is admitted when nothing else is queued (it could never run otherwise)."""
        refusal = self.inflight_refusal()
        if refusal is not None:
            raise refusal
        queued = self.num_queued_prompt_tokens
        if (
            self.max_queued_prompt_tokens
            and queued
            and (queued + num_prompt_tokens > self.max_queued_prompt_tokens)
        ):
            raise Overloaded(
                f"too many prompt tokens waiting for this model ({queued} queued, limit "
                f"{self.max_queued_prompt_tokens}); retry later",
                reason="queued_tokens_limit",
                retry_after_s=OVERLOAD_RETRY_AFTER_S,
            )
        self.num_inflight += 1
        self.num_queued_prompt_tokens += num_prompt_tokens

    def first_token(self, num_prompt_tokens: int) -> None:
        self.num_queued_prompt_tokens -= num_prompt_tokens

    def finish(self) -> None:
        self.num_inflight -= 1


@dataclass(slots=True)
class _Window:
    """(time, amount) entries of the last ``WINDOW_S`` seconds and their sum."""

    entries: deque[list[float]] = field(default_factory=deque)
    total: float = 0.0

    def expire(self, now_s: float) -> None:
        while self.entries and self.entries[0][0] <= now_s - WINDOW_S:
            self.total -= self.entries.popleft()[1]

    def seconds_until_fits(self, amount: float, limit: float, now_s: float) -> float:
        """Seconds until ``total + amount <= limit`` as entries age out (inf: never)."""
        excess = self.total + amount - limit
        for at_s, value in self.entries:
            excess -= value
            if excess <= 0:
                return at_s + WINDOW_S - now_s
        return math.inf


@dataclass(slots=True)
class KeyCharge:
    """What one admitted request was charged (settled when it ends)."""

    key: str
    entry: list[float]  # the [time, tokens] entry in the key's token window


class KeyRateLimiter:
    """Requests and tokens per minute per key name (sliding 60 s window)."""

    def __init__(self) -> None:
        self._requests: dict[str, _Window] = {}
        self._tokens: dict[str, _Window] = {}

    def admit(
        self,
        key: str,
        num_tokens: int,
        now_s: float,
        *,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
    ) -> KeyCharge | None:
        """Charge one request of ``num_tokens`` (prompt + max_tokens) to ``key`` or raise
        ``Overloaded``; None when the key has no limits."""
        if not requests_per_minute and not tokens_per_minute:
            return None
        refusal = self.request_refusal(key, now_s, requests_per_minute=requests_per_minute)
        if refusal is not None:
            raise refusal
        requests = self._requests.setdefault(key, _Window())
        tokens = self._tokens.setdefault(key, _Window())
        requests.expire(now_s)
        tokens.expire(now_s)
        if tokens_per_minute and tokens.total and tokens.total + num_tokens > tokens_per_minute:
            wait_s = tokens.seconds_until_fits(num_tokens, tokens_per_minute, now_s)
            raise Overloaded(
                f"key {key!r}: more than {tokens_per_minute} tokens per minute "
                f"(this request: {num_tokens}, prompt plus max_tokens)",
                reason="key_tokens_per_minute",
                retry_after_s=math.ceil(min(wait_s, WINDOW_S)),
            )
        requests.entries.append([now_s, 1.0])
        requests.total += 1
        entry = [now_s, float(num_tokens)]
        tokens.entries.append(entry)
        tokens.total += num_tokens
        return KeyCharge(key, entry)

    def request_refusal(
        self, key: str, now_s: float, *, requests_per_minute: int | None
    ) -> Overloaded | None:
        """The refusal of one more request from ``key`` while its request window is full,
        else None: charges nothing (the edge asks before parsing a body)."""
        if not requests_per_minute:
            return None
        requests = self._requests.setdefault(key, _Window())
        requests.expire(now_s)
        if requests.total + 1 <= requests_per_minute:
            return None
        wait_s = requests.seconds_until_fits(1, requests_per_minute, now_s)
        return Overloaded(
            f"key {key!r}: more than {requests_per_minute} requests per minute",
            reason="key_requests_per_minute",
            retry_after_s=math.ceil(wait_s),
        )

    def settle(self, charge: KeyCharge, num_used_tokens: int) -> None:
        """Replace the admission estimate by the tokens really used (if still in the window)."""
        window = self._tokens.get(charge.key)
        if window is None or not any(e is charge.entry for e in window.entries):
            return
        window.total += num_used_tokens - charge.entry[1]
        charge.entry[1] = float(num_used_tokens)

    def forget(self, keep: set[str]) -> None:
        """Drop the windows of keys no longer configured (after a keys-file reload)."""
        for windows in (self._requests, self._tokens):
            for key in list(windows):
                if key not in keep:
                    del windows[key]
