"""Local deployments and the production switch: no request is dropped while switching."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.frontend.conftest import start_frontend
from workflows.pipeline import PublishParams
from workflows.steps.deploy import (
    DeployError,
    deploy_candidate,
    list_deployments,
    stop_deployment,
    switch_production,
)

MODEL = "smollm2-135m-instruct"


def test_switch_production_drops_no_request(smollm2_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "deployments"
    params = PublishParams(name=MODEL, engine="mock")
    old = deploy_candidate(params, "1", smollm2_dir, root=root)
    new = deploy_candidate(params, "2", smollm2_dir, root=root)
    assert deploy_candidate(params, "2", smollm2_dir, root=root) == new  # reused while healthy
    frontend = start_frontend(smollm2_dir, [old.endpoint])
    switched = threading.Event()
    try:

        async def load() -> list[tuple[str | None, int]]:
            async with openai.AsyncOpenAI(
                base_url=frontend.base_url, api_key="x", max_retries=0, timeout=120
            ) as client:

                async def one(i: int) -> tuple[str | None, int]:
                    stream = await client.completions.create(
                        model=MODEL, prompt=[10 + i] * 20, max_tokens=150, stream=True
                    )
                    finish, num_tokens = None, 0
                    async for chunk in stream:
                        num_tokens += len(chunk.choices[0].model_extra["token_ids"] or [])
                        finish = chunk.choices[0].finish_reason or finish
                        if num_tokens >= 5 and i == 0 and not switched.is_set():
                            switched.set()
                            await asyncio.to_thread(
                                switch_production, frontend.url, new.endpoint, MODEL, root=root
                            )
                    return finish, num_tokens

                return list(await asyncio.gather(*(one(i) for i in range(12))))

        results = asyncio.run(load())
        assert switched.is_set()
        assert results == [("length", 150)] * 12
        workers = httpx.get(f"{frontend.url}/admin/workers").json()["workers"]
        assert [w["url"] for w in workers] == [new.endpoint]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{old.endpoint}/health")
        assert [d.name for d in list_deployments(root)] == [new.name]
    finally:
        frontend.stop()
        for deployment in list_deployments(root):
            stop_deployment(deployment)


def test_kubernetes_target_is_a_clear_error(tmp_path: Path) -> None:
    params = PublishParams(name=MODEL, deploy_target="kubernetes")
    with pytest.raises(DeployError, match="not available yet"):
        deploy_candidate(params, "1", tmp_path, root=tmp_path)
