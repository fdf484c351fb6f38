"""A migrating stream waits for a healthy worker for a while; a new request does not."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from serving.frontend.state import FrontendSettings
from serving.frontend.streaming import _version_to_try
from serving.protocol.openai import APIError


class FlakyModel:
    """``version_for`` finds no healthy worker ``num_down`` times, then one."""

    def __init__(self, num_down: int) -> None:
        self.num_down = num_down
        self.calls = 0
        self.version = SimpleNamespace(version="v1", pool=SimpleNamespace(decode_ids=lambda: ["w"]))

    def version_for(self, version: str | None) -> object | None:
        self.calls += 1
        return None if self.calls <= self.num_down else self.version


def _state(wait_s: float) -> SimpleNamespace:
    return SimpleNamespace(settings=FrontendSettings(migration_wait_s=wait_s))


def test_a_migrating_stream_waits_for_a_worker_to_come_back() -> None:
    served = FlakyModel(num_down=2)
    job = SimpleNamespace(num_migrations=1, version="v1")
    version = asyncio.run(_version_to_try(_state(30.0), served, job))
    assert version is served.version and served.calls == 3


def test_a_new_request_gets_503_at_once_and_a_migration_after_the_wait() -> None:
    served = FlakyModel(num_down=10**6)
    with pytest.raises(APIError) as new:
        asyncio.run(
            _version_to_try(_state(30.0), served, SimpleNamespace(num_migrations=0, version=None))
        )
    assert new.value.status_code == 503 and served.calls == 1
    with pytest.raises(APIError) as migrating:
        asyncio.run(
            _version_to_try(_state(0.0), served, SimpleNamespace(num_migrations=1, version=None))
        )
    assert migrating.value.status_code == 503
