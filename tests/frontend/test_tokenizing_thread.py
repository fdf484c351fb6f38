"""The frontend tokenizes short prompts on the event loop and long ones on its own thread, never
two prompts at once."""

from __future__ import annotations

import asyncio
import threading

from serving.frontend.tokenizing import Tokenizing, prompt_chars


class _Encoder:
    """Records the thread of each call; fails if two calls overlap. ``gate`` holds long prompts
    (more than 3 characters) until the test opens it."""

    def __init__(self) -> None:
        self.busy = threading.Lock()
        self.threads: dict[str, str] = {}
        self.started = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, text: str, *, offset: int) -> list[int]:
        assert self.busy.acquire(blocking=False), "two prompts tokenized at once"
        try:
            self.threads[text] = threading.current_thread().name
            if len(text) > 3:
                self.started.set()
                assert self.gate.wait(timeout=30)
            return [ord(c) + offset for c in text]
        finally:
            self.busy.release()


def test_short_prompts_on_the_loop_long_ones_on_the_thread() -> None:
    encode = _Encoder()

    async def main() -> list[list[int]]:
        tokenize = Tokenizing(inline_prompt_chars=3)
        try:
            calls = [tokenize(len(t), encode, t, offset=1) for t in ("a", "bcde", "fghij")]
            return list(await asyncio.gather(*calls))
        finally:
            tokenize.close()

    assert asyncio.run(main()) == [[98], [99, 100, 101, 102], [103, 104, 105, 106, 107]]
    assert encode.threads["a"] == threading.main_thread().name
    assert encode.threads["bcde"].startswith("tokenize")
    assert encode.threads["fghij"].startswith("tokenize")


def test_short_prompt_waits_for_the_thread_while_it_holds_a_long_one() -> None:
    encode = _Encoder()
    encode.gate.clear()

    async def main() -> tuple[list[int], list[int]]:
        tokenize = Tokenizing(inline_prompt_chars=3)
        try:
            long = asyncio.ensure_future(tokenize(4, encode, "long", offset=0))
            await asyncio.to_thread(encode.started.wait, 30)
            short = asyncio.ensure_future(tokenize(1, encode, "s", offset=0))
            await asyncio.sleep(0)  # the short call has been handed over, not run inline
            encode.gate.set()
            return await long, await short
        finally:
            tokenize.close()

    assert asyncio.run(main()) == ([108, 111, 110, 103], [115])
    assert encode.threads["s"].startswith("tokenize")


def test_closed_tokenizer_thread_starts_again() -> None:
    tokenize = Tokenizing(inline_prompt_chars=0)

    async def once() -> list[int]:
        return await tokenize(1, lambda: [1, 2])

    assert asyncio.run(once()) == [1, 2]
    tokenize.close()
    assert asyncio.run(once()) == [1, 2]
    tokenize.close()


def test_prompt_chars_counts_text_content() -> None:
    messages = [{"role": "system", "content": "abc"}, {"role": "user", "content": "de"},
                {"role": "assistant"}]  # fmt: skip
    assert prompt_chars(messages) == 5
