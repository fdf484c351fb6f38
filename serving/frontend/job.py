"""One client request as the frontend carries it across workers (``Job``), and the token-id
request it sends to a worker. Plain data and pure functions: no I/O."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from serving.frontend.workers import Worker
from serving.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    check_prompt,
    new_id,
)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# Fields forwarded verbatim to workers when the client set them.
FORWARDED_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "kv_transfer_params",
)


@dataclass(slots=True)
class Job:
    """A client request: its prompt ids, what workers produced so far, and how it ended."""

    request_id: str
    model: str
    body: ChatCompletionRequest | CompletionRequest
    prompt_ids: list[int]
    max_tokens: int
    logprobs: int | None
    session_id: str | None
    arrival_s: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int | None = None
    # The router's prediction, reported when a worker does not say (vLLM without
    # --enable-prompt-tokens-details).
    predicted_cached_tokens: int = 0
    num_migrations: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    last_token_s: float | None = None
    sent_text: str = ""
    version: str | None = None  # the model version serving it (migrations stay on it)


def make_job(
    body: ChatCompletionRequest | CompletionRequest,
    prompt_ids: list[int],
    *,
    headers: Any,
    prefix: str,
    max_tokens: int | None,
    default_max_tokens: int | None,
    logprobs: int | None,
    vocab_size: int,
    max_model_len: int,
) -> Job:
    """Validate the prompt against the model's limits (raises ``APIError``) and build the job.

    ``headers``: the client's request headers (``x-request-id``, ``x-session-id``).
    """
    max_tokens = check_prompt(
        prompt_ids,
        vocab_size=vocab_size,
        max_model_len=max_model_len,
        max_tokens=max_tokens,
        default_max_tokens=default_max_tokens,
    )
    header_id = headers.get("x-request-id")
    return Job(
        request_id=f"{prefix}-{header_id}" if header_id else new_id(prefix),
        model=body.model,
        body=body,
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        logprobs=logprobs,
        session_id=headers.get("x-session-id") or body.user,
    )


def worker_payload(job: Job, worker: Worker) -> dict[str, Any]:
    """A token-id completions request carrying everything produced so far."""
    fields = job.body.model_dump(include=set(FORWARDED_FIELDS), exclude_unset=True)
    payload: dict[str, Any] = {
        **fields,
        "model": worker.model_name,
        "prompt": job.prompt_ids + job.output_ids,
        "max_tokens": job.max_tokens - len(job.output_ids),
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    if job.logprobs is not None:
        payload["logprobs"] = job.logprobs
    return payload


def unsent_text(tokenizer: Any, job: Job) -> str:
    """Text of tokens already produced that the failed worker had not sent yet (it holds back
    text that could start a stop string, and bytes of an incomplete character)."""
    skip = getattr(job.body, "skip_special_tokens", True)
    full = tokenizer.decode(job.output_ids, skip_special_tokens=skip)
    if full.endswith("\ufffd") or not full.startswith(job.sent_text):
        return ""
    return full[len(job.sent_text) :]
