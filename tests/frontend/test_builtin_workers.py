"""The frontend over real SmolLM2 workers (CPU): the OpenAI client end to end, and a worker
killed mid-stream under 24 concurrent requests without changing a single output token."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.frontend.conftest import start_frontend
from tests.worker.conftest import WorkerProcess, metric, scrape, start_worker_process

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
KEY = "test-key"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def builtin_workers(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[WorkerProcess]]:
    logs = tmp_path_factory.mktemp("builtin-workers")
    args = ["--model", str(smollm2_dir), "--kv-events-port", "0", "--served-model-name", MODEL]
    workers = [start_worker_process(args, logs / f"w{i}.log") for i in range(3)]
    yield workers
    for worker in workers:
        worker.stop()


def test_openai_client_through_the_frontend(
    smollm2_dir: Path, builtin_workers: list[WorkerProcess]
) -> None:
    frontend = start_frontend(smollm2_dir, [w.url for w in builtin_workers[:2]], api_key=KEY)
    try:
        client = openai.OpenAI(base_url=frontend.base_url, api_key=KEY, max_retries=0)
        chat = client.chat.completions.create(
            model=MODEL, messages=FRANCE, temperature=0, max_tokens=30
        )
        assert chat.choices[0].message.content == "The capital of France is Paris."
        assert chat.choices[0].finish_reason == "stop"
        completion = client.completions.create(
            model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8
        )
        assert completion.choices[0].text.startswith(" Paris")
        assert completion.usage.completion_tokens == 8
        stream = client.chat.completions.create(
            model=MODEL, messages=FRANCE, temperature=0, max_tokens=30, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            chat.choices[0].message.content
        )
        # The second identical prompt hits the prefix cache of the worker that served the first.
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 32
        text_stream = client.completions.create(
            model=MODEL, prompt="1, 2, 3,", temperature=0, max_tokens=6, stream=True
        )
        assert "".join(c.choices[0].text for c in text_stream).startswith(" 4, 5")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=frontend.base_url, api_key="nope", max_retries=0).models.list()
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4", messages=FRANCE)
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=0)
        assert bad.value.body["param"] == "max_tokens"
        with pytest.raises(openai.BadRequestError) as too_long:
            client.completions.create(model=MODEL, prompt=[1] * 8200, max_tokens=1)
        assert too_long.value.body["code"] == "context_length_exceeded"
    finally:
        frontend.stop()


PROMPTS = [
    f"Write one sentence about {topic}."
    for topic in (
        "rivers", "mountains", "bread", "trains", "owls", "winter", "violins", "copper",
        "tides", "maps", "glass", "bees", "chess", "deserts", "lanterns", "salt",
        "comets", "harbours", "paper", "wolves", "orchards", "bridges", "ink", "storms",
    )
]  # fmt: skip


def test_kill_a_worker_under_24_concurrent_streams(
    smollm2_dir: Path, builtin_workers: list[WorkerProcess]
) -> None:
    frontend = start_frontend(smollm2_dir, [w.url for w in builtin_workers])
    request = {"model": MODEL, "temperature": 0, "max_tokens": 32,
               "extra_body": {"ignore_eos": True}}  # fmt: skip

    def messages(prompt: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": prompt}]

    try:
        client = openai.OpenAI(base_url=frontend.base_url, api_key="x", max_retries=0)
        alone = [
            client.chat.completions.create(messages=messages(p), **request)
            .choices[0]
            .model_extra["token_ids"]
            for p in PROMPTS
        ]
        killed: list[WorkerProcess] = []
        produced = 0

        async def one(aclient: openai.AsyncOpenAI, prompt: str) -> list[int]:
            nonlocal produced
            stream = await aclient.chat.completions.create(
                messages=messages(prompt), stream=True, **request
            )
            token_ids: list[int] = []
            async for chunk in stream:
                if not chunk.choices:
                    continue
                new = chunk.choices[0].model_extra.get("token_ids") or []
                token_ids += new
                produced += len(new)
                if not killed and produced >= 24 * 6:  # every stream is well under way
                    victim = max(
                        builtin_workers,
                        key=lambda w: metric(scrape(w.url), "vllm:num_requests_running"),
                    )
                    victim.proc.send_signal(signal.SIGKILL)
                    killed.append(victim)
            return token_ids

        async def run_all() -> list[list[int]]:
            async with openai.AsyncOpenAI(
                base_url=frontend.base_url, api_key="x", max_retries=0, timeout=600
            ) as aclient:
                return list(await asyncio.gather(*(one(aclient, p) for p in PROMPTS)))

        together = asyncio.run(run_all())
        assert killed, "a worker was meant to be killed mid-stream"
        assert all(len(t) == 32 for t in together)
        differing = [PROMPTS[i] for i, (a, b) in enumerate(zip(alone, together, strict=True))
                     if a != b]  # fmt: skip
        assert not differing, f"outputs changed: {differing}"
        values = scrape(frontend.url)
        assert metric(values, "strata_frontend_migrations_total") >= 1
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{killed[0].url}/health")
    finally:
        frontend.stop()
