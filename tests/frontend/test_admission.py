"""Admission, keys and admin rights at the frontend's edge, over one real mock worker.

429 with ``Retry-After`` for what the frontend cannot take (in-flight and per-key limits),
every admitted request completes; an inference key gets 403 on ``/admin``; keys reload from
the file without a restart; oversized bodies get 413.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from serving.frontend.auth import hash_key
from tests.frontend.conftest import FrontendServer, mock_worker_in_thread, start_frontend
from tests.worker.conftest import labelled, scrape

MODEL = "smollm2-135m-instruct"
TEAM, OPS, NEWCOMER = "sk-team-0123", "sk-ops-4567", "sk-new-89ab"


@pytest.fixture(scope="module")
def slow_worker(smollm2_dir: Path) -> Iterator[str]:
    """A mock worker at its modelled speed (about 6 ms per token): streams overlap."""
    worker = mock_worker_in_thread(smollm2_dir, name=MODEL)
    yield worker.url
    worker.stop()


def write_keys(path: Path, team_rpm: int, extra: str = "") -> None:
    path.write_text(
        "keys:\n"
        f"  - {{name: team, sha256: {hash_key(TEAM)}, requests_per_minute: {team_rpm}}}\n"
        f"  - {{name: ops, sha256: {hash_key(OPS)}, role: admin}}\n" + extra
    )


@pytest.fixture
def keyed(smollm2_dir: Path, slow_worker: str, tmp_path: Path) -> Iterator[FrontendServer]:
    keys = tmp_path / "keys.yaml"
    write_keys(keys, team_rpm=4)
    frontend = start_frontend(smollm2_dir, [slow_worker], keys_file=keys,
                              max_request_bytes=64 * 1024)  # fmt: skip
    frontend.state.settings.keys_reload_interval_s = 0.05
    try:
        yield frontend
    finally:
        frontend.stop()


def test_in_flight_limit_answers_429_with_retry_after_and_admitted_complete(
    smollm2_dir: Path, slow_worker: str
) -> None:
    frontend = start_frontend(smollm2_dir, [slow_worker], max_inflight_requests=2)
    try:

        async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str | None, int]:
            response = await client.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": [1, 2, 3 + i], "max_tokens": 200},
            )
            tokens = response.json()["usage"]["completion_tokens"] if response.is_success else 0
            if response.status_code == 429:
                assert response.json()["error"]["code"] == "inflight_limit"
            return response.status_code, response.headers.get("retry-after"), tokens

        async def burst() -> list[tuple[int, str | None, int]]:
            async with httpx.AsyncClient(base_url=frontend.url, timeout=120) as client:
                return list(await asyncio.gather(*(one(client, i) for i in range(8))))

        results = asyncio.run(burst())
        admitted = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] == 429]
        assert len(admitted) == 2 and len(refused) == 6, results
        assert all(tokens == 200 for _, _, tokens in admitted)  # admitted ones complete
        assert all(retry == "1" for _, retry, _ in refused)
        values = scrape(frontend.url)
        assert labelled(values, "strata_frontend_rejected_requests_total",
                        model=MODEL, reason="inflight_limit") == 6  # fmt: skip
        assert labelled(values, "strata_frontend_requests_total", model=MODEL, status="429") == 6
        # Everything released: a new request is admitted.
        again = httpx.post(f"{frontend.url}/v1/completions",
                           json={"model": MODEL, "prompt": [9], "max_tokens": 2})  # fmt: skip
        assert again.status_code == 200
        assert labelled(scrape(frontend.url), "strata_frontend_queued_prompt_tokens") == 0
    finally:
        frontend.stop()


def test_a_full_model_is_refused_at_the_edge_before_any_tokenizing(
    smollm2_dir: Path, slow_worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the in-flight limit a chat request gets its 429 from the body's ``model`` alone:
    the prompt is never validated or tokenized (CPU an overloaded frontend does not have)."""
    import serving.frontend.app as frontend_app

    calls: list[int] = []
    encode_chat = frontend_app.encode_chat

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return encode_chat(*args, **kwargs)

    monkeypatch.setattr(frontend_app, "encode_chat", counted)
    frontend = start_frontend(smollm2_dir, [slow_worker], max_inflight_requests=1)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}]}
    try:
        with httpx.Client(base_url=frontend.base_url, timeout=120) as client:
            body = {**chat, "max_tokens": 400, "stream": True}
            with client.stream("POST", "/chat/completions", json=body) as held:
                assert held.status_code == 200  # headers wait for the first token: admitted
                assert calls == [1]
                refused = client.post("/chat/completions", json={**chat, "max_tokens": 2})
                # Not validated either: a field the route would refuse with 400.
                unchecked = client.post("/chat/completions",
                                        json={**chat, "max_tokens": "many"})  # fmt: skip
                held.read()
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "inflight_limit"
        assert unchecked.status_code == 429
        assert calls == [1]
        values = scrape(frontend.url)
        assert labelled(values, "strata_frontend_requests_total", model=MODEL, status="429") == 2
        assert labelled(values, "strata_frontend_rejection_seconds_count", model=MODEL) == 2
        # The slot is free again: the next one is tokenized and served.
        assert httpx.post(f"{frontend.base_url}/chat/completions",
                          json={**chat, "max_tokens": 2}).status_code == 200  # fmt: skip
        assert calls == [1, 1]
    finally:
        frontend.stop()


def test_inference_key_gets_403_on_admin_and_admin_key_works(keyed: FrontendServer) -> None:
    base = keyed.url
    team = {"Authorization": f"Bearer {TEAM}"}
    ops = {"Authorization": f"Bearer {OPS}"}
    denied = httpx.get(f"{base}/admin/workers", headers=team)
    assert denied.status_code == 403
    assert denied.json()["error"]["type"] == "permission_error"
    assert httpx.get(f"{base}/admin/workers").status_code == 401
    listed = httpx.get(f"{base}/admin/workers", headers=ops)
    assert listed.status_code == 200 and len(listed.json()["workers"]) == 1
    # The admin credential is not an inference key either.
    assert httpx.get(f"{base}/v1/models", headers=ops).status_code == 403
    client = openai.OpenAI(base_url=keyed.base_url, api_key=TEAM, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.base_url, api_key="sk-wrong", max_retries=0).models.list()
    values = scrape(base)
    assert labelled(values, "strata_frontend_auth_failures_total", reason="forbidden") == 2
    assert labelled(values, "strata_frontend_auth_failures_total", reason="unauthorized") == 2


def test_key_rate_limit_and_keys_reload_without_restart(keyed: FrontendServer) -> None:
    client = openai.OpenAI(base_url=keyed.base_url, api_key=TEAM, max_retries=0)
    for _ in range(4):
        client.completions.create(model=MODEL, prompt=[5, 6], max_tokens=2)
    with pytest.raises(openai.RateLimitError) as limited:
        client.completions.create(model=MODEL, prompt=[5, 6], max_tokens=2)
    retry_after = int(limited.value.response.headers["retry-after"])
    assert 50 <= retry_after <= 60
    assert limited.value.body["code"] == "key_requests_per_minute"
    newcomer = openai.OpenAI(base_url=keyed.base_url, api_key=NEWCOMER, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        newcomer.models.list()
    # Edit the file: a higher limit for the team, a new key. No restart, no admin call.
    keys_file = keyed.state.settings.keys_file
    assert keys_file is not None
    write_keys(keys_file, team_rpm=100,
               extra=f"  - {{name: newcomer, sha256: {hash_key(NEWCOMER)}}}\n")  # fmt: skip
    new_headers = {"Authorization": f"Bearer {NEWCOMER}"}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if httpx.get(f"{keyed.base_url}/models", headers=new_headers).status_code == 200:
            break
        time.sleep(0.05)
    assert newcomer.completions.create(model=MODEL, prompt=[7], max_tokens=2).usage
    client.completions.create(model=MODEL, prompt=[5, 6], max_tokens=2)  # new limit applies
    # A broken file keeps the keys in use (and says so in the metrics).
    keys_file.write_text("keys: [{name: x}]\n")
    ops = {"Authorization": f"Bearer {OPS}"}
    reload = httpx.post(f"{keyed.url}/admin/keys/reload", headers=ops)
    assert reload.status_code == 400 and "keys.0.sha256" in reload.json()["error"]["message"]
    assert newcomer.models.list().data
    assert labelled(scrape(keyed.url), "strata_frontend_keys_reloads_total", outcome="error") >= 1


def test_oversized_bodies_get_413(keyed: FrontendServer) -> None:
    headers = {"Authorization": f"Bearer {TEAM}"}
    big = {"model": MODEL, "prompt": "x" * 70_000, "max_tokens": 1}
    sized = httpx.post(f"{keyed.base_url}/completions", json=big, headers=headers)
    assert sized.status_code == 413 and sized.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts the bytes
        yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
        for _ in range(80):
            yield b"y" * 1000
        yield b'"}'

    chunked = httpx.post(f"{keyed.base_url}/completions", content=chunks(),
                         headers={**headers, "content-type": "application/json"})  # fmt: skip
    assert chunked.status_code == 413
