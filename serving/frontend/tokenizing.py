"""Where the frontend tokenizes a prompt: on the event loop when it is short, else on one thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any

# Prompts up to this many characters (about 500 tokens) are rendered and tokenized on the event
# loop: that costs the loop 1-2 ms. Sending one to the thread costs more while the loop is busy
# relaying other streams: the thread waits for the GIL (up to the 5 ms switch interval) each
# time it takes it back, and a burst of prompts queues behind it (measured under aiperf, 256-token
# chat prompts: 1 ms of tokenizer CPU took 10-70 ms from hand-off to result).
INLINE_PROMPT_CHARS = 2048


class Tokenizing:
    """Owns the frontend's tokenizer thread. Long prompts are rendered and tokenized there, one
    at a time, while the event loop goes on relaying other requests' tokens (``tokenizers``
    encodes without the GIL); short ones on the loop itself, unless the thread holds a prompt.
    So a tokenizer is never used by two threads at once, as in vLLM's frontend (one thread).
    The thread starts on first use."""

    def __init__(self, inline_prompt_chars: int = INLINE_PROMPT_CHARS) -> None:
        self.inline_prompt_chars = inline_prompt_chars
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._num_on_thread = 0

    async def __call__(
        self, num_chars: int, fn: Callable[..., list[int]], *args: Any, **kwargs: Any
    ) -> list[int]:
        """``fn(*args, **kwargs)`` for a prompt of ``num_chars`` characters."""
        if num_chars <= self.inline_prompt_chars and self._num_on_thread == 0:
            return fn(*args, **kwargs)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        call = functools.partial(fn, *args, **kwargs)
        self._num_on_thread += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        finally:
            self._num_on_thread -= 1

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def prompt_chars(messages: list[dict[str, Any]]) -> int:
    """Characters of text in chat ``messages`` (as ``ChatMessage.for_template`` gives them)."""
    return sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
