"""A real ``strata serve`` stack scraped by a real Prometheus, for the integration tests: start
and stop both, wait for scrapes and rule evaluations (polling, no fixed sleeps), query
Prometheus' HTTP API, drive OpenAI load."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.observability.conftest import REPO_ROOT, RULES_FILE
from tests.worker.conftest import free_port

PROMETHEUS = shutil.which("prometheus")
NO_PROMETHEUS = "prometheus not on PATH: apt-get install prometheus (.ci/run installs it in CI)"
DEADLINE_S = 90.0


@dataclass
class Stack:
    prometheus_url: str
    frontend_url: str
    worker_urls: list[str]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; raises with Prometheus' own error text on an invalid expression."""
        response = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": expr},
                             timeout=10)  # fmt: skip
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus rejected {expr!r}: {body.get('error')}")
        return body["data"]["result"]

    def value(self, expr: str) -> float:
        """The value of an expression that yields exactly one sample."""
        (sample,) = self.query(expr)
        return float(sample["value"][1])


def wait_until(what: str, condition: Any, deadline_s: float = DEADLINE_S) -> None:
    """Poll ``condition`` (returns truthy when done) until ``deadline_s``; no fixed sleeps."""
    deadline = time.monotonic() + deadline_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (httpx.HTTPError, KeyError, ValueError, IndexError) as exc:
            last_error = exc
        time.sleep(0.2)
    raise TimeoutError(f"{what} not within {deadline_s:.0f} s (last error: {last_error})")


def start_serve(model_dir: Path, tmp: Path, *serve_args: str) -> tuple[subprocess.Popen, str]:
    """``strata serve --engine mock`` with ``serve_args`` (the workers), until healthy."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "workflows.cli", "serve", "--model", str(model_dir),
         *serve_args, "--engine", "mock", "--port", str(port),
         "--worker-arg=--speedup=20", "--log-level", "warning"],
        cwd=tmp,  # worker logs go to tmp/.strata/logs
        env=os.environ | {"PYTHONPATH": str(REPO_ROOT)},
        stdout=(tmp / "serve.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"strata serve exited:\n{(tmp / 'serve.log').read_text()[-3000:]}")
        return httpx.get(f"{url}/health", timeout=2).status_code == 200

    wait_or_stop(proc, "strata serve healthy", healthy, deadline_s=600)  # minutes at load 20+
    return proc, url


def start_prometheus(tmp: Path, targets: dict[str, list[str]]) -> tuple[subprocess.Popen, str]:
    """Prometheus with a 1 s scrape and rule interval, file service discovery and our rules."""
    assert PROMETHEUS is not None, NO_PROMETHEUS
    (tmp / "targets").mkdir()
    groups = [{"targets": hosts, "labels": {"component": name}} for name, hosts in targets.items()]
    (tmp / "targets" / "strata.json").write_text(json.dumps(groups))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES_FILE)],
        "scrape_configs": [
            {"job_name": "strata", "file_sd_configs": [{"files": [str(tmp / "targets/*.json")]}]}
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--log.level=warn"],
        stdout=(tmp / "prometheus.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_or_stop(
        proc, "Prometheus ready", lambda: httpx.get(f"{url}/-/ready", timeout=2).is_success
    )
    return proc, url


def wait_or_stop(
    proc: subprocess.Popen, what: str, condition: Any, deadline_s: float = DEADLINE_S
) -> None:
    """``wait_until``; on failure, stop the process that did not come up."""
    try:
        wait_until(what, condition, deadline_s)
    except BaseException:
        stop(proc)
        raise


def stop(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM (``strata serve`` then stops its workers), SIGKILL after ``timeout_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def drive_load(frontend_url: str, model: str, num_requests: int) -> None:
    """Chat and completions, streamed and not, sharing a prefix (prefix-cache hits), from 8
    threads (every worker gets traffic), plus one request for an unknown model (404) and one
    too long for the served model (400)."""
    client = openai.OpenAI(base_url=f"{frontend_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):  # an error of the served model (its panels)
        client.completions.create(model=model, prompt="x", max_tokens=10**9)
    system = "You are a helpful assistant for the Strata observability test. " * 4

    def one(i: int) -> None:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Q{i}"}]
        if i % 2:
            stream = client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=12,
                stream=True,
            )
            assert sum(1 for _ in stream) > 0
        else:
            out = client.completions.create(model=model, prompt=system + str(i), max_tokens=12)
            assert out.usage is not None and 0 < out.usage.completion_tokens <= 12
            # Sampled text may end early (a real model's end of sequence), never silently.
            expected = "length" if out.usage.completion_tokens == 12 else "stop"
            assert out.choices[0].finish_reason == expected

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(num_requests)))


def wait_until_up(stack: Stack, num_targets: int) -> None:
    """Every target scraped (before the load, so that rate() sees counters rise from 0)."""
    wait_until(f"{num_targets} targets up", lambda: num_up(stack) == num_targets)


def wait_for_scrapes_and_rules(stack: Stack, after_s: float) -> None:
    """Two scrapes of every target after ``after_s`` (epoch), then one rule evaluation after
    those."""
    wait_until("scrapes after the load", lambda: oldest_scrape_s(stack) > after_s + 2.0)
    wait_until("rules evaluated", lambda: oldest_rule_evaluation_s(stack) > after_s + 2.5)


def num_up(stack: Stack) -> int:
    return sum(float(s["value"][1]) == 1 for s in stack.query('up{job="strata"}'))


def oldest_scrape_s(stack: Stack) -> float:
    return stack.value('min(timestamp(up{job="strata"}))')


def oldest_rule_evaluation_s(stack: Stack) -> float:
    groups = httpx.get(f"{stack.prometheus_url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert groups, "Prometheus loaded no rule group"
    return min(_rfc3339_s(g["lastEvaluation"]) for g in groups)


def _rfc3339_s(text: str) -> float:
    """Prometheus' RFC 3339 times carry nanoseconds; datetime takes microseconds."""
    match = re.fullmatch(r"(.*?T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-].*)", text)
    assert match, text
    seconds, fraction, zone = match.groups()
    parsed = datetime.fromisoformat(seconds + ("+00:00" if zone == "Z" else zone))
    return parsed.timestamp() + float(f"0.{fraction or 0}")
