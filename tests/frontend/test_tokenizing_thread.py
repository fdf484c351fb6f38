"""The frontend tokenizes prompts on its own thread, one prompt at a time."""

from __future__ import annotations

import asyncio
import threading

from serving.frontend.app import Tokenizing


def test_prompts_are_tokenized_off_the_loop_one_at_a_time() -> None:
    busy = threading.Lock()
    threads: list[str] = []

    def encode(text: str, *, offset: int) -> list[int]:
        assert busy.acquire(blocking=False), "two prompts tokenized at once"
        try:
            threads.append(threading.current_thread().name)
            return [ord(c) + offset for c in text]
        finally:
            busy.release()

    async def main() -> list[list[int]]:
        tokenize = Tokenizing()
        try:
            return list(await asyncio.gather(*(tokenize(encode, t, offset=1) for t in "abc")))
        finally:
            tokenize.close()

    assert asyncio.run(main()) == [[98], [99], [100]]
    assert threads[0].startswith("tokenize") and threading.main_thread().name not in threads


def test_closed_tokenizer_thread_starts_again() -> None:
    tokenize = Tokenizing()

    async def once() -> list[int]:
        return await tokenize(lambda: [1, 2])

    assert asyncio.run(once()) == [1, 2]
    tokenize.close()
    assert asyncio.run(once()) == [1, 2]
    tokenize.close()
