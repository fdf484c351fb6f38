"""OpenAI response bodies from worker choices: stream chunks, whole responses, usage, logprobs.

Pure functions over a ``Job`` and the workers' completion choices; no I/O.
"""

from __future__ import annotations

from typing import Any

from serving.frontend.job import Job
from serving.frontend.sse import encode_event
from serving.protocol.openai import CompletionRequest, now_s, usage_dict


def usage(job: Job) -> dict[str, Any]:
    return usage_dict(len(job.prompt_ids), len(job.output_ids), job.num_cached_tokens or 0)


def sse(payload: dict[str, Any]) -> bytes:
    return encode_event(payload)


def chat_chunk(
    job: Job, created: int, delta: dict[str, Any], choice: dict[str, Any] | None
) -> dict[str, Any]:
    out: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
    if choice is not None:
        out["finish_reason"] = choice.get("finish_reason")
        if choice.get("finish_reason") is not None:
            out["stop_reason"] = choice.get("stop_reason")
        out["token_ids"] = choice.get("token_ids")
        if choice.get("logprobs"):
            out["logprobs"] = {"content": chat_logprobs([choice["logprobs"]])}
    return {
        "id": job.request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": job.model,
        "choices": [out],
    }


def stream_chunk(job: Job, created: int, choice: dict[str, Any], chat: bool) -> dict[str, Any]:
    if chat:
        text = choice.get("text") or ""
        return chat_chunk(job, created, {"content": text} if text else {}, choice)
    out = {
        "index": 0,
        "text": choice.get("text") or "",
        "logprobs": choice.get("logprobs"),
        "finish_reason": choice.get("finish_reason"),
        "stop_reason": choice.get("stop_reason"),
        "token_ids": choice.get("token_ids"),
    }
    return {
        "id": job.request_id,
        "object": "text_completion",
        "created": created,
        "model": job.model,
        "choices": [out],
    }


def usage_chunk(job: Job, created: int, chat: bool) -> dict[str, Any]:
    """The last stream chunk when ``stream_options.include_usage`` is set."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    return {"id": job.request_id, "object": obj, "created": created, "model": job.model,
            "choices": [], "usage": usage(job)}  # fmt: skip


def merge_completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    for part in parts:
        for key in merged:
            merged[key].extend(part.get(key) or [])
    return {**merged, "text_offset": []}


def chat_logprobs(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged = merge_completion_logprobs(parts)
    content = []
    for token, logprob, top in zip(
        merged["tokens"], merged["token_logprobs"], merged["top_logprobs"], strict=False
    ):
        content.append(
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(t.encode())}
                    for t, v in (top or {}).items()
                ],
            }
        )
    return content


def full_response(
    job: Job, text: str, logprobs: list[dict[str, Any]], chat: bool
) -> dict[str, Any]:
    common = {"finish_reason": job.finish_reason, "stop_reason": job.stop_reason,
              "token_ids": job.output_ids}  # fmt: skip
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": {"content": chat_logprobs(logprobs)} if job.logprobs is not None else None,
            **common,
        }
        obj = "chat.completion"
    else:
        prompt = job.body.prompt if isinstance(job.body, CompletionRequest) else None
        if isinstance(job.body, CompletionRequest) and job.body.echo and isinstance(prompt, str):
            text = prompt + text
        choice = {
            "index": 0,
            "text": text,
            "logprobs": merge_completion_logprobs(logprobs) if job.logprobs is not None else None,
            **common,
        }
        obj = "text_completion"
    return {
        "id": job.request_id,
        "object": obj,
        "created": now_s(),
        "model": job.model,
        "choices": [choice],
        "usage": usage(job),
        "kv_transfer_params": None,
    }
