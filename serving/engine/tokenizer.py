"""Prompt -> token ids with the model's own tokenizer and chat template (shared by every server).

The worker and the frontend must tokenize identically, or routing by cached prefix silently
degrades; both call these two functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def render_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The chat template applied to ``messages`` (raises ``ValueError`` on a bad conversation)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model has no chat template; use /v1/completions")
    try:
        return tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **(chat_template_kwargs or {}),
        )
    except Exception as exc:  # jinja2 TemplateError, raise_exception() in templates
        raise ValueError(f"messages: the chat template rejected the conversation: {exc}") from exc


def encode_prompt(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text``. Chat prompts are already rendered with their special tokens."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    text = render_chat(
        tokenizer,
        messages,
        add_generation_prompt=add_generation_prompt,
        chat_template_kwargs=chat_template_kwargs,
    )
    return encode_prompt(tokenizer, text, add_special_tokens=False)
