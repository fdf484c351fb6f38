"""Loopback helpers shared by the process supervisors, the deploy step, benchmarks and tests."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Any

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port ``p`` with ``p + 1`` also free (KV events PUB and its replay socket)."""
    for _ in range(100):
        port = free_port(host)
        try:
            with socket.socket() as sock:
                sock.bind((host, port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair on loopback")


def is_healthy(url: str, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(
    url: str, proc: subprocess.Popen | None = None, timeout_s: float = 120.0
) -> dict[str, Any]:
    """Poll ``url/health`` until 200 (with a deadline, not a fixed sleep); returns its JSON.

    Raises ``RuntimeError`` if ``proc`` exits first, ``TimeoutError`` at the deadline.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            response = httpx.get(f"{url}/health", timeout=2.0)
            if response.status_code == 200:
                try:
                    return response.json()
                except ValueError:
                    return {}
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not healthy after {timeout_s:.0f} s")
