"""tests/vllm: the session's vLLM pool and KV-event capture (``tests/vllm/fixtures.py``)."""

import pytest

from tests.vllm.fixtures import vllm_kv_capture, vllm_pool, vllm_reference, vllm_worker

__all__ = ["vllm_kv_capture", "vllm_pool", "vllm_reference", "vllm_worker"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kills_vllm_worker: SIGKILLs a worker of the session's vLLM pool (runs last)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``kills_vllm_worker`` run last: the pool restarts the worker they kill, and a
    vLLM start (minutes) would compete with every test after them."""
    items.sort(key=lambda item: item.get_closest_marker("kills_vllm_worker") is not None)
