"""Frontend + router over real mock-engine workers (served in this process: fast, no compute)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from serving.engine.tokenizer import encode_chat
from tests.frontend.conftest import FrontendServer, mock_worker_in_thread, start_frontend
from tests.worker.conftest import ThreadServer, metric, scrape

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def mock_workers(smollm2_dir: Path) -> Iterator[list[ThreadServer]]:
    """Two mock workers with KV events, served in this process (no start-up imports)."""
    workers = [mock_worker_in_thread(smollm2_dir, name=MODEL, speedup=50) for _ in range(2)]
    yield workers
    for worker in workers:
        worker.stop()


def routed_counts(frontend: FrontendServer) -> dict[str, float]:
    counts: dict[str, float] = {}
    for key, value in scrape(frontend.url).items():
        if key.startswith("strata_router_decisions_total"):
            worker = key.split('worker="')[1].split('"')[0]
            counts[worker] = counts.get(worker, 0) + value
    return counts


def wait_for(predicate, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_kv_router_sends_a_shared_prefix_back_to_the_worker_that_holds_it(
    smollm2_dir: Path, mock_workers: list[ThreadServer]
) -> None:
    frontend = start_frontend(smollm2_dir, [w.url for w in mock_workers], router="kv")
    try:
        client = openai.OpenAI(base_url=frontend.base_url, api_key="x", max_retries=0)
        prefixes = [[1000 + 7 * p + i for i in range(256)] for p in range(4)]

        async def first_round() -> None:
            # Concurrent: while one worker is busy the router spreads load to the other.
            async with openai.AsyncOpenAI(
                base_url=frontend.base_url, api_key="x", max_retries=0
            ) as aclient:
                await asyncio.gather(
                    *(
                        aclient.completions.create(model=MODEL, prompt=[*p, 1], max_tokens=64)
                        for p in prefixes
                    )
                )

        asyncio.run(first_round())
        before = routed_counts(frontend)
        assert len([w for w, c in before.items() if c > 0]) == 2, before
        # Every prefix is now indexed on the worker that served it.
        wait_for(lambda: len(frontend.router().indexer) >= 4 * 16)
        for p, prefix in enumerate(prefixes):
            again = client.completions.create(model=MODEL, prompt=[*prefix, 2, 3], max_tokens=4)
            # Only the worker that served the prefix has it: a hit proves the routing.
            assert again.usage.prompt_tokens_details.cached_tokens == 256, p
        values = scrape(frontend.url)
        after = routed_counts(frontend)
        assert sum(after.values()) - sum(before.values()) == 4
        cached = metric(values, "strata_frontend_cached_prompt_tokens_total")
        assert cached == 4 * 256  # the first round found nothing cached
        predicted = metric(values, "strata_router_predicted_cached_tokens_total")
        assert predicted == 4 * 256
    finally:
        frontend.stop()


def test_round_robin_alternates(smollm2_dir: Path, mock_workers: list[ThreadServer]) -> None:
    frontend = start_frontend(smollm2_dir, [w.url for w in mock_workers], router="round-robin")
    try:
        client = openai.OpenAI(base_url=frontend.base_url, api_key="x", max_retries=0)
        for _ in range(6):
            client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=2)
        assert sorted(routed_counts(frontend).values()) == [3.0, 3.0]
    finally:
        frontend.stop()


def test_chat_streaming_and_usage_through_the_frontend(
    smollm2_dir: Path, mock_workers: list[ThreadServer]
) -> None:
    frontend = start_frontend(smollm2_dir, [w.url for w in mock_workers])
    try:
        client = openai.OpenAI(base_url=frontend.base_url, api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "Hello there"}]
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=12, stream=True,
                stream_options={"include_usage": True},
            )
        )  # fmt: skip
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].usage.completion_tokens == 12
        # The chat template is applied once, at the frontend, with the model's own tokenizer.
        expected_prompt = encode_chat(frontend.tokenizer(), messages)
        assert chunks[-1].usage.prompt_tokens == len(expected_prompt) == 32
        token_ids = [
            t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids") or []
        ]
        assert len(token_ids) == 12
        # What one network read carries reaches the client as one piece (tokens coalesce on a
        # loaded machine): the frontend's ITL is between the pieces the client received.
        num_pieces = sum(
            1 for c in chunks if c.choices and c.choices[0].model_extra.get("token_ids")
        )
        whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
        assert whole.usage.completion_tokens == 12
        assert whole.choices[0].finish_reason == "length"
        values = scrape(frontend.url)
        assert metric(values, "strata_frontend_time_to_first_token_seconds_count") >= 2
        assert metric(values, "strata_frontend_inter_token_latency_seconds_count") >= num_pieces - 1
    finally:
        frontend.stop()


def test_errors_auth_and_bad_requests(smollm2_dir: Path, mock_workers: list[ThreadServer]) -> None:
    frontend = start_frontend(smollm2_dir, [mock_workers[0].url], api_key="sekrit")
    try:
        anonymous = openai.OpenAI(base_url=frontend.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            anonymous.models.list()
        client = openai.OpenAI(base_url=frontend.base_url, api_key="sekrit", max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other", prompt="x")
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model=MODEL, prompt="x", top_p=0)
        assert bad.value.body["param"] == "top_p"
        with pytest.raises(openai.BadRequestError) as too_long:
            client.completions.create(model=MODEL, prompt=[1] * 9000, max_tokens=1)
        assert too_long.value.body["code"] == "context_length_exceeded"
        assert httpx.get(f"{frontend.url}/health").status_code == 200  # health needs no key
    finally:
        frontend.stop()


def test_workers_register_and_deregister_at_run_time(
    smollm2_dir: Path, mock_workers: list[ThreadServer]
) -> None:
    frontend = start_frontend(smollm2_dir, [mock_workers[0].url])
    try:
        admin = httpx.Client(base_url=f"{frontend.url}/admin")
        added = admin.post("/workers", json={"url": mock_workers[1].url, "worker_id": "extra"})
        assert added.status_code == 201, added.text
        assert added.json()["kv_events_endpoint"].startswith("tcp://127.0.0.1:")
        listed = {w["worker_id"] for w in admin.get("/workers").json()["workers"]}
        assert listed == {"worker-0", "extra"}
        client = openai.OpenAI(base_url=frontend.base_url, api_key="x", max_retries=0)
        for i in range(4):
            client.completions.create(model=MODEL, prompt=[300 + i] * 40, max_tokens=2)
        indexer = frontend.router().indexer
        wait_for(lambda: indexer.num_blocks("extra") > 0)
        assert admin.delete("/workers/extra").status_code == 200
        assert "extra" not in indexer.worker_ids()
        assert admin.delete("/workers/extra").status_code == 404
        bad = admin.post("/workers", json={"url": "http://127.0.0.1:1"})
        assert bad.status_code == 400 and "/v1/models failed" in bad.json()["error"]["message"]
    finally:
        frontend.stop()


def test_kv_router_warns_loudly_about_a_worker_without_events(
    smollm2_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    silent = mock_worker_in_thread(smollm2_dir, name=MODEL, speedup=50, kv_events=False)
    frontend = start_frontend(smollm2_dir, [silent.url], kv_events_grace_s=0.0)
    try:
        client = openai.OpenAI(base_url=frontend.base_url, api_key="x", max_retries=0)
        client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2)
        wait_for(
            lambda: metric(scrape(frontend.url), "strata_router_workers_without_kv_events") == 1
        )
        assert any("published no KV events" in r.getMessage() for r in caplog.records)
    finally:
        frontend.stop()
        silent.stop()


def test_session_affinity_by_header(smollm2_dir: Path, mock_workers: list[ThreadServer]) -> None:
    frontend = start_frontend(smollm2_dir, [w.url for w in mock_workers], router="session")
    try:
        for session in ("alice", "bob", "carol", "dave"):
            client = openai.OpenAI(
                base_url=frontend.base_url,
                api_key="x",
                max_retries=0,
                default_headers={"x-session-id": session},
            )
            before = routed_counts(frontend)
            for _ in range(3):
                client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2)
            after = routed_counts(frontend)
            grown = {w: after[w] - before.get(w, 0) for w in after if after[w] != before.get(w)}
            assert list(grown.values()) == [3.0], (session, grown)  # one worker, all three
    finally:
        frontend.stop()
