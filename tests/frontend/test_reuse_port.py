"""Several frontends on one port (``--reuse-port``): the kernel spreads connections over them,
each serves what it takes with its own router index and its own counts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving.frontend.serve import reuse_port_socket
from tests.frontend.conftest import mock_worker_in_thread, start_frontend
from tests.worker.conftest import free_port, labelled, scrape

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def worker_url(smollm2_dir: Path) -> Iterator[str]:
    worker = mock_worker_in_thread(smollm2_dir, name=MODEL, speedup=100.0)
    yield worker.url
    worker.stop()


def test_two_frontends_share_one_port(smollm2_dir: Path, worker_url: str) -> None:
    port = free_port()
    frontends = [
        start_frontend(smollm2_dir, [worker_url], sock=reuse_port_socket("127.0.0.1", port))
        for _ in range(2)
    ]
    try:
        assert {f.url for f in frontends} == {f"http://127.0.0.1:{port}"}
        body = {"model": MODEL, "prompt": [1, 2, 3, 4], "max_tokens": 4}
        for _ in range(24):  # a new connection each time: the kernel picks a frontend
            response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body)
            assert response.status_code == 200
            assert response.json()["usage"]["completion_tokens"] == 4
        labels = {"model": MODEL, "endpoint": "/v1/completions", "status": "200"}
        counts = [f.state.metrics.registry.get_sample_value("strata_frontend_requests_total",
                                                            labels) for f in frontends]  # fmt: skip
        assert sum(counts) == 24 and min(counts) > 0, counts  # both took connections
        # A scrape reaches one process and shows that process's counts only.
        scraped = labelled(scrape(f"http://127.0.0.1:{port}"), "strata_frontend_requests_total",
                           **labels)  # fmt: skip
        assert scraped in counts
    finally:
        for frontend in frontends:
            frontend.stop()
