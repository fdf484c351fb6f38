"""The planner's shell: figures from a frontend's real ``/metrics`` exposition, the runner
ticking over the Kubernetes connector (recording fake API server) with an injected clock, the
metrics it exports, a broken source, and the ``strata planner`` command's errors."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from typer.testing import CliRunner

from serving.frontend.metrics import FrontendMetrics
from serving.planner.cli import build_runner
from serving.planner.config import MetricsSourceConfig, load_config
from serving.planner.metrics_source import (
    Histogram,
    ScrapeSource,
    parse_frontend,
    quantile,
    traffic_between,
)
from tests.planner.conftest import formula_profile
from tests.planner.fake_kube_scale import ScalingFakeKubeAPI
from tests.workflows.fake_kube_api import write_kubeconfig
from workflows.cli import app

MODEL = "m"


def test_quantile_is_prometheus_histogram_quantile() -> None:
    h = Histogram(((0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (float("inf"), 40.0)), 12.0, 40.0)
    assert quantile(0.25, h) == pytest.approx(0.1)  # rank 10: the top of the first bucket
    assert quantile(0.5, h) == pytest.approx(0.1 + 0.4 * (20 - 10) / 20)
    assert quantile(0.9, h) == pytest.approx(0.5 + 0.5 * (36 - 30) / 10)
    assert quantile(0.9, Histogram(((1.0, 0.0), (float("inf"), 0.0)), 0.0, 0.0)) is None


def test_traffic_from_two_scrapes_of_a_real_frontend_registry() -> None:
    metrics = FrontendMetrics(MODEL)
    metrics.add_model(MODEL)
    first = parse_frontend(generate_latest(metrics.registry).decode(), MODEL, 100.0)
    for ttft in (0.05, 0.2, 0.3, 1.5):  # four requests, 100 prompt and 20 output tokens each
        metrics.ttft.labels(model=MODEL).observe(ttft)
        metrics.e2e.labels(model=MODEL).observe(2.0)
        metrics.prompt_tokens.labels(model=MODEL).inc(100)
        metrics.output_tokens.labels(model=MODEL).inc(20)
        for _ in range(19):
            metrics.itl.labels(model=MODEL).observe(0.01)
    metrics.e2e.labels(model="other").observe(1.0)  # another model's traffic: not ours
    second = parse_frontend(generate_latest(metrics.registry).decode(), MODEL, 110.0)
    traffic = traffic_between(first, second)
    assert traffic.window_s == 10.0
    assert (traffic.request_rate, traffic.num_requests) == (0.4, 4.0)
    assert (traffic.input_tokens, traffic.output_tokens) == (100.0, 20.0)
    assert traffic.output_tokens_rate == 8.0
    assert traffic.ttft_mean_s == pytest.approx(0.5125)
    assert traffic.itl_mean_s == pytest.approx(0.01)
    assert 0.3 < traffic.ttft_p90_s <= 2.5  # inside the bucket holding the 1.5 s sample
    # Six more arrive and are still in flight: the rate is the demand, not the throughput.
    metrics.active_requests.labels(model=MODEL).inc(6)
    third = parse_frontend(generate_latest(metrics.registry).decode(), MODEL, 120.0)
    assert (traffic_between(first, third).request_rate, third.active) == (0.5, 6.0)


class FrontendFake:
    """A frontend's ``/metrics`` (a real ``FrontendMetrics`` registry) and ``/admin/workers``."""

    def __init__(self) -> None:
        self.metrics = FrontendMetrics(MODEL)
        self.metrics.add_model(MODEL)
        self.workers: list[dict[str, Any]] = []
        self.up = True
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if not fake.up:
                    self.send_response(503)
                    self.end_headers()
                    return
                if self.path == "/metrics":
                    data = generate_latest(fake.metrics.registry)
                else:
                    data = json.dumps({"workers": fake.workers}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def serve(self, num_requests: int, ttft_s: float = 0.2) -> None:
        for _ in range(num_requests):
            self.metrics.ttft.labels(model=MODEL).observe(ttft_s)
            self.metrics.e2e.labels(model=MODEL).observe(3.0)
            self.metrics.prompt_tokens.labels(model=MODEL).inc(1000)
            self.metrics.output_tokens.labels(model=MODEL).inc(200)
            self.metrics.itl.labels(model=MODEL).observe(0.02)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def frontend() -> Iterator[FrontendFake]:
    fake = FrontendFake()
    yield fake
    fake.stop()


def test_scrape_source_says_why_it_has_no_figures(frontend: FrontendFake) -> None:
    source = ScrapeSource(MetricsSourceConfig(frontend_url=frontend.url), MODEL)
    first = source.sample(0.0)
    assert first.traffic is None and first.error == "first scrape: rates need a second one"
    frontend.serve(30)
    assert source.sample(10.0).traffic.request_rate == pytest.approx(3.0)
    frontend.up = False
    broken = source.sample(20.0)
    assert broken.traffic is None
    assert broken.error == f"GET {frontend.url}/metrics: HTTP 503"


def write_config(tmp_path: Path, frontend_url: str, kubeconfig: Path, **extra: Any) -> Path:
    profile = tmp_path / "profile.json"
    formula_profile().save(profile)
    data = {
        "model": MODEL,
        "profile": "profile.json",  # relative to the config file
        "roles": {"both": {"min_replicas": 1, "max_replicas": 8}},
        "predictor": {"kind": "constant"},
        # No correction factor: this test checks the shell, the core's tests check the rest.
        "scaling": {"interval_s": 10, "model_interval_s": 10,
                    "min_requests_for_correction": 1_000_000},
        "metrics": {"kind": "scrape", "frontend_url": frontend_url, "window_s": 60},
        "connector": {"kind": "kubernetes",
                      "kubernetes": {"namespace": "ns", "in_cluster": False,
                                     "kubeconfig": str(kubeconfig)}},
        **extra,
    }  # fmt: skip
    path = tmp_path / "planner.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_runner_scales_a_deployment_and_exports_its_metrics(
    tmp_path: Path, frontend: FrontendFake
) -> None:
    kube = ScalingFakeKubeAPI()
    server = kube.start()
    try:
        kube.add_deployment("ns", "strata-both", "both", 1)
        config = load_config(
            write_config(tmp_path, frontend.url, write_kubeconfig(tmp_path, server))
        )
        runner = build_runner(config, admin_key=None)
        now = [1000.0]
        runner.clock = lambda: now[0]
        assert runner.run_once().holding  # first scrape: no rate yet, size held
        per_replica = runner.state.capacity.per_replica("both", 1000, 200).request_rate
        frontend.serve(int(per_replica * 2.5 * 10))  # 2.5 replicas' worth over 10 s
        now[0] += 10
        decision = runner.run_once()
        assert decision.roles["both"].target == 3
        assert kube.objects[("deployments", "ns", "strata-both")]["spec"]["replicas"] == 3
        exposition = generate_latest(runner.metrics.registry).decode()
        assert 'strata_planner_desired_replicas{model="m",role="both"} 3.0' in exposition
        assert (
            'strata_planner_scaling_decisions_total{direction="up",model="m",role="both"} 1.0'
            in exposition
        )
        assert 'strata_planner_metrics_source_up{model="m"} 1.0' in exposition
        assert 'strata_planner_cost_usd_per_hour{model="m"} 4.0' in exposition  # 1 GPU at $4
        # The source breaks: the size is held, the metrics say so.
        frontend.up = False
        now[0] += 10
        held = runner.run_once()
        assert held.holding and held.roles["both"].target == held.roles["both"].current == 3
        assert kube.objects[("deployments", "ns", "strata-both")]["spec"]["replicas"] == 3
        exposition = generate_latest(runner.metrics.registry).decode()
        assert 'strata_planner_metrics_source_up{model="m"} 0.0' in exposition
        # Ten seconds of three replicas at $4 per GPU-hour accrued.
        assert (
            f'strata_planner_cost_usd_total{{model="m"}} {4 * 10 / 3600 + 12 * 10 / 3600}'
            in exposition
        )
    finally:
        kube.stop()


def test_advisory_mode_changes_nothing(tmp_path: Path, frontend: FrontendFake) -> None:
    kube = ScalingFakeKubeAPI()
    server = kube.start()
    try:
        kube.add_deployment("ns", "strata-both", "both", 1)
        path = write_config(tmp_path, frontend.url, write_kubeconfig(tmp_path, server),
                            mode="advisory")  # fmt: skip
        runner = build_runner(load_config(path), admin_key=None)
        now = [0.0]
        runner.clock = lambda: now[0]
        runner.run_once()
        frontend.serve(400)
        now[0] += 10
        assert runner.run_once().roles["both"].target > 1
        assert not [r for r in kube.requests if r.method == "PATCH"]
    finally:
        kube.stop()


def test_planner_command_names_the_bad_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:1", tmp_path / "none", scalling={})
    result = CliRunner().invoke(app, ["planner", "--config", str(path)])
    assert result.exit_code == 2
    assert "planner.yaml: scalling: Extra inputs are not permitted" in result.output
    path = write_config(tmp_path, "http://127.0.0.1:1", tmp_path / "none",
                        connector={"kind": "local"})  # fmt: skip
    result = CliRunner().invoke(app, ["planner", "--config", str(path)])
    assert result.exit_code == 2 and "strata serve --planner" in result.output
