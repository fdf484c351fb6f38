"""Where the planner's observations come from: the Prometheus HTTP API (in a cluster) or a
direct scrape of the frontend's and workers' ``/metrics`` (locally).

Traffic is the frontend's view (what clients see): requests finished, prompt and output
tokens, TTFT and ITL histograms of ``model``. The request rate is the demand, not the
throughput: requests finished plus the growth of those in flight
(``strata_frontend_active_requests``), so a pool too short to keep up still sees every
arrival. Queues come from the workers (vLLM's gauges
``vllm:num_requests_waiting``/``running``, ``vllm:kv_cache_usage_perc``), summed per role.

A source that cannot answer returns ``MetricsSample(traffic=None, error=...)``: the core then
holds every role's size and says why. The window arithmetic (``traffic_between``,
``quantile``) is pure; the classes do the HTTP.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from serving.planner.config import MetricsSourceConfig
from serving.planner.types import Traffic

logger = logging.getLogger(__name__)

_FE = "strata_frontend"
_REQUESTS = f"{_FE}_request_duration_seconds"
_TTFT = f"{_FE}_time_to_first_token_seconds"
_ITL = f"{_FE}_inter_token_latency_seconds"
_ACTIVE = f"{_FE}_active_requests"


@dataclass(frozen=True, slots=True)
class RoleStats:
    num_waiting: float = 0.0
    num_running: float = 0.0
    kv_usage: float | None = None


@dataclass(frozen=True, slots=True)
class MetricsSample:
    traffic: Traffic | None
    roles: dict[str, RoleStats] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Histogram:
    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), +Inf last
    sum: float
    count: float

    def minus(self, older: Histogram) -> Histogram:
        old = dict(older.buckets)
        return Histogram(
            tuple((le, c - old.get(le, 0.0)) for le, c in self.buckets),
            self.sum - older.sum,
            self.count - older.count,
        )


@dataclass(frozen=True, slots=True)
class FrontendSnapshot:
    time_s: float
    requests: float
    prompt_tokens: float
    output_tokens: float
    ttft: Histogram
    itl: Histogram
    active: float = 0.0  # requests in flight


def quantile(q: float, histogram: Histogram) -> float | None:
    """``histogram_quantile`` as Prometheus computes it (linear within a bucket)."""
    total = histogram.buckets[-1][1] if histogram.buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for le, count in histogram.buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_bound
            width = count - lower_count
            return lower_bound + (le - lower_bound) * ((rank - lower_count) / width if width else 1)
        lower_bound, lower_count = le, count
    return lower_bound


def traffic_between(older: FrontendSnapshot, newer: FrontendSnapshot) -> Traffic:
    """Rates and means between two scrapes (counter resets count from zero)."""
    window_s = max(newer.time_s - older.time_s, 1e-9)
    requests = _delta(newer.requests, older.requests)
    arrived = max(requests + newer.active - older.active, 0.0)
    ttft = newer.ttft.minus(older.ttft) if newer.ttft.count >= older.ttft.count else newer.ttft
    itl = newer.itl.minus(older.itl) if newer.itl.count >= older.itl.count else newer.itl
    output = _delta(newer.output_tokens, older.output_tokens)
    return Traffic(
        window_s=window_s,
        request_rate=arrived / window_s,
        num_requests=requests,
        input_tokens=_delta(newer.prompt_tokens, older.prompt_tokens) / requests
        if requests
        else None,
        output_tokens=output / requests if requests else None,
        output_tokens_rate=output / window_s,
        ttft_mean_s=ttft.sum / ttft.count if ttft.count > 0 else None,
        ttft_p90_s=quantile(0.9, ttft),
        itl_mean_s=itl.sum / itl.count if itl.count > 0 else None,
        itl_p90_s=quantile(0.9, itl),
    )


def _delta(new: float, old: float) -> float:
    return new - old if new >= old else new


def parse_frontend(text: str, model: str, time_s: float) -> FrontendSnapshot:
    """The frontend's counters and histograms for ``model`` from a ``/metrics`` body."""
    values: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {_TTFT: {}, _ITL: {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            name = sample.name
            if name.endswith("_bucket") and name[: -len("_bucket")] in buckets:
                le = float(sample.labels["le"])
                per_le = buckets[name[: -len("_bucket")]]
                per_le[le] = per_le.get(le, 0.0) + sample.value
            else:
                values[name] = values.get(name, 0.0) + sample.value

    def histogram(base: str) -> Histogram:
        return Histogram(
            tuple(sorted(buckets[base].items())),
            values.get(f"{base}_sum", 0.0),
            values.get(f"{base}_count", 0.0),
        )

    return FrontendSnapshot(
        time_s=time_s,
        requests=values.get(f"{_REQUESTS}_count", 0.0),
        prompt_tokens=values.get(f"{_FE}_prompt_tokens_total", 0.0),
        output_tokens=values.get(f"{_FE}_output_tokens_total", 0.0),
        ttft=histogram(_TTFT),
        itl=histogram(_ITL),
        active=values.get(_ACTIVE, 0.0),
    )


def parse_worker(text: str) -> RoleStats:
    values: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values.setdefault(sample.name, []).append(sample.value)
    usage = values.get("vllm:kv_cache_usage_perc")
    return RoleStats(
        num_waiting=sum(values.get("vllm:num_requests_waiting", [])),
        num_running=sum(values.get("vllm:num_requests_running", [])),
        kv_usage=max(usage) if usage else None,
    )


def merge_role_stats(per_worker: list[tuple[str, RoleStats]]) -> dict[str, RoleStats]:
    out: dict[str, RoleStats] = {}
    for role in {r for r, _ in per_worker}:
        stats = [s for r, s in per_worker if r == role]
        usages = [s.kv_usage for s in stats if s.kv_usage is not None]
        out[role] = RoleStats(
            num_waiting=sum(s.num_waiting for s in stats),
            num_running=sum(s.num_running for s in stats),
            kv_usage=sum(usages) / len(usages) if usages else None,
        )
    return out


class ScrapeSource:
    """Scrapes the frontend (``/metrics``, ``/admin/workers``) and each worker's ``/metrics``;
    keeps the frontend's snapshots of the last window to turn counters into rates."""

    def __init__(self, config: MetricsSourceConfig, model: str, admin_key: str | None = None):
        self.config = config
        self.model = model
        self.url = config.frontend_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.http = httpx.Client(timeout=config.timeout_s)
        self.snapshots: deque[FrontendSnapshot] = deque()

    def sample(self, now_s: float) -> MetricsSample:
        try:
            response = self.http.get(f"{self.url}/metrics")
            response.raise_for_status()
            snapshot = parse_frontend(response.text, self.model, now_s)
        except (httpx.HTTPError, ValueError) as exc:
            return MetricsSample(None, error=f"GET {self.url}/metrics: {_describe(exc)}")
        self.snapshots.append(snapshot)
        while len(self.snapshots) > 2 and self.snapshots[1].time_s <= now_s - self.config.window_s:
            self.snapshots.popleft()
        roles = self._worker_stats()
        if len(self.snapshots) < 2:
            return MetricsSample(None, roles, error="first scrape: rates need a second one")
        return MetricsSample(traffic_between(self.snapshots[0], snapshot), roles)

    def _worker_stats(self) -> dict[str, RoleStats]:
        try:
            listing = self.http.get(f"{self.url}/admin/workers", headers=self.headers)
            listing.raise_for_status()
            workers = listing.json()["workers"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            logger.warning("planner: no worker list from %s: %s", self.url, _describe(exc))
            return {}
        per_worker = []
        for worker in workers:
            if worker.get("model", self.model) != self.model:
                continue
            try:
                text = self.http.get(f"{worker['url']}/metrics").text
                per_worker.append((worker.get("role", "both"), parse_worker(text)))
            except (httpx.HTTPError, ValueError) as exc:
                logger.info("planner: worker %s metrics: %s", worker.get("url"), _describe(exc))
        return merge_role_stats(per_worker)

    def close(self) -> None:
        self.http.close()


class PrometheusSource:
    """The same figures from Prometheus' HTTP API (``/api/v1/query``), over ``window_s``.

    Queues per role join the workers' gauges with ``strata_worker_info`` (which carries the
    role) on ``instance``; workers without it (stock vLLM) count as role ``both``.
    """

    def __init__(self, config: MetricsSourceConfig, model: str) -> None:
        assert config.prometheus_url is not None
        self.url = config.prometheus_url.rstrip("/")
        self.model = model
        self.window = f"{max(int(config.window_s), 1)}s"
        self.http = httpx.Client(timeout=config.timeout_s)

    def sample(self, now_s: float) -> MetricsSample:
        m, w = f'model="{self.model}"', self.window
        rate = f"sum(rate({_REQUESTS}_count{{{m}}}[{w}]))"
        # Arrivals: finished plus the growth of those in flight (0 without the gauge).
        growth = f"(sum(delta({_ACTIVE}{{{m}}}[{w}])) or vector(0)) / {w[:-1]}"

        def mean(base: str) -> str:
            return f"sum(rate({base}_sum{{{m}}}[{w}])) / sum(rate({base}_count{{{m}}}[{w}]))"

        queries = {
            "rate": rate,
            "arrival_rate": f"clamp_min({rate} + {growth}, 0)",
            "requests": f"sum(increase({_REQUESTS}_count{{{m}}}[{w}]))",
            "input": f"sum(rate({_FE}_prompt_tokens_total{{{m}}}[{w}])) / {rate}",
            "output_rate": f"sum(rate({_FE}_output_tokens_total{{{m}}}[{w}]))",
            "ttft_mean": mean(_TTFT),
            "ttft_p90": f"histogram_quantile(0.9, sum by (le) (rate({_TTFT}_bucket{{{m}}}[{w}])))",
            "itl_mean": mean(_ITL),
            "itl_p90": f"histogram_quantile(0.9, sum by (le) (rate({_ITL}_bucket{{{m}}}[{w}])))",
        }
        try:
            got = {key: self._scalar(expr) for key, expr in queries.items()}
            roles = self._roles()
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            return MetricsSample(None, error=f"Prometheus {self.url}: {_describe(exc)}")
        rate_value = got["rate"] or 0.0
        output_rate = got["output_rate"] or 0.0
        traffic = Traffic(
            window_s=float(self.window[:-1]),
            request_rate=got["arrival_rate"] or rate_value,
            num_requests=got["requests"] or 0.0,
            input_tokens=got["input"],
            output_tokens=output_rate / rate_value if rate_value else None,
            output_tokens_rate=output_rate,
            ttft_mean_s=got["ttft_mean"],
            ttft_p90_s=got["ttft_p90"],
            itl_mean_s=got["itl_mean"],
            itl_p90_s=got["itl_p90"],
        )
        return MetricsSample(traffic, roles)

    def _query(self, expr: str) -> list[dict]:
        response = self.http.get(f"{self.url}/api/v1/query", params={"query": expr})
        body = response.json()
        if body.get("status") != "success":
            raise ValueError(f"query {expr!r} failed: {body.get('error')}")
        return body["data"]["result"]

    def _scalar(self, expr: str) -> float | None:
        """One sample's value; None for no series or NaN (no traffic in the window)."""
        result = self._query(expr)
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if math.isnan(value) else value

    def _roles(self) -> dict[str, RoleStats]:
        m = f'model_name="{self.model}"'
        info = f"strata_worker_info{{{m}}}"
        out: dict[str, dict[str, float]] = {}
        for key, gauge in (("num_waiting", "vllm:num_requests_waiting"),
                           ("num_running", "vllm:num_requests_running"),
                           ("kv_usage", "vllm:kv_cache_usage_perc")):  # fmt: skip
            agg = "avg" if key == "kv_usage" else "sum"
            expr = f"{agg} by (role) ({gauge}{{{m}}} * on (instance) group_left (role) {info})"
            for series in self._query(expr):
                role = series["metric"].get("role", "both")
                out.setdefault(role, {})[key] = float(series["value"][1])
        return {role: RoleStats(**values) for role, values in out.items()}

    def close(self) -> None:
        self.http.close()


def make_source(
    config: MetricsSourceConfig, model: str, admin_key: str | None = None
) -> ScrapeSource | PrometheusSource:
    if config.kind == "prometheus":
        return PrometheusSource(config, model)
    return ScrapeSource(config, model, admin_key)


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
