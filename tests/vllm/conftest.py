"""tests/vllm: the session's vLLM pool and KV-event capture (``tests/vllm/fixtures.py``)."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

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


def _shared_segments() -> set[Path]:
    shm = Path("/dev/shm")
    return {*shm.glob("psm_*"), *shm.glob("sem.mp-*")} if shm.is_dir() else set()


def _mapped_segments() -> set[Path]:
    """Segments some live process still maps (the processes whose maps this user may read)."""
    mapped: set[Path] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is another user's
            continue
        mapped.update(Path(line.split()[-1]) for line in text.splitlines() if "/dev/shm/" in line)
    return mapped


@pytest.fixture(scope="session", autouse=True)
def _remove_segments_of_killed_workers() -> Iterator[None]:
    """A SIGKILLed vLLM process leaves its shared-memory segments (~400 MB on the CPU backend)
    and semaphores in /dev/shm: once the session's processes are gone, remove those created
    during the session that no process maps."""
    before = _shared_segments()
    yield
    for segment in _shared_segments() - before - _mapped_segments():
        with contextlib.suppress(OSError):  # another user's, or already gone
            segment.unlink()
