"""OpenAI-compatible request/response schemas (plus vLLM's extensions), shared by every server.

Requests ignore unknown fields, as OpenAI's and vLLM's servers do for forward compatibility;
fields we know are validated strictly. Errors use OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving.engine.request import SamplingParams

# -- errors -----------------------------------------------------------------------------------


class APIError(Exception):
    """An error the HTTP edge turns into OpenAI error JSON with ``status_code``."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def model_not_found(model: str) -> APIError:
    return APIError(
        f"The model `{model}` does not exist.",
        status_code=404,
        type="NotFoundError",
        param="model",
        code="model_not_found",
    )


def context_length_exceeded(num_prompt_tokens: int, max_tokens: int, limit: int) -> APIError:
    return APIError(
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, "
        f"{max_tokens} in the completion). Please reduce the length of the messages or completion.",
        status_code=400,
        param="messages",
        code="context_length_exceeded",
    )


def check_prompt(
    prompt_ids: list[int],
    *,
    vocab_size: int,
    max_model_len: int,
    max_tokens: int | None,
    default_max_tokens: int | None,
) -> int:
    """Validate a tokenized prompt against the model; returns the effective ``max_tokens``.

    ``default_max_tokens=None`` means "the rest of the context" (chat, as vLLM does).
    """
    num_prompt = len(prompt_ids)
    if num_prompt == 0:
        raise APIError("prompt is empty", param="prompt")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(
            f"prompt: token id {bad[0]} is out of range for vocabulary size {vocab_size}",
            param="prompt",
        )
    room = max_model_len - num_prompt
    if room < 1 or (max_tokens is not None and max_tokens > room):
        raise context_length_exceeded(num_prompt, max_tokens or 1, max_model_len)
    if max_tokens is not None:
        return max_tokens
    return room if default_max_tokens is None else min(default_max_tokens, room)


# -- requests ---------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(BaseModel):
    """Sampling fields common to both endpoints, with vLLM's extensions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, description="vLLM: -1 or 0 disables")
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    kv_transfer_params: dict[str, Any] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        return stops

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value is None or value in (0, -1):
            return None
        if value < -1:
            raise ValueError("top_k must be -1 (disabled) or >= 1")
        return value

    def sampling_params(
        self, *, default_max_tokens: int, logprobs: int | None, stop_token_ids: list[int]
    ) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []) + stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def for_template(self) -> dict[str, Any]:
        """Plain dict for the chat template; text parts joined (images are not supported)."""
        data = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                parts.append(part["text"])
            data["content"] = "".join(parts)
        return data


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, value: Any) -> str | list[int]:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            return value
        if isinstance(value, list) and len(value) == 1:
            return value[0]
        if isinstance(value, list) and not value:
            raise ValueError("prompt is empty")
        raise ValueError("batched prompts are not supported: send one prompt per request")


# -- responses --------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def usage_dict(num_prompt: int, num_completion: int, num_cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
        "prompt_tokens_details": {"cached_tokens": num_cached},
    }


def model_card(name: str, max_model_len: int, root: str | None = None) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": now_s(),
        "owned_by": "strata",
        "root": root or name,
        "parent": None,
        "max_model_len": max_model_len,
    }
