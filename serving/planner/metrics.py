"""The planner's own metrics (``strata_planner_*``, label ``model``), names as planned in
``grafana/planned_metrics.py`` before the planner existed, plus the cost figures.

Every labelled child is created at 0 when its label values are known (roles at start), so that
``rate()``/``increase()`` see a counter from its first sample.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from serving.planner.config import PlannerConfig
from serving.planner.types import Decision

_P = "strata_planner"


class PlannerMetrics:
    """Owns a registry; ``record`` turns one decision (and the replicas seen) into series."""

    def __init__(
        self, model: str, roles: tuple[str, ...], registry: CollectorRegistry | None = None
    ):
        self.model = model
        self.registry = registry or CollectorRegistry()
        r = self.registry
        role_labels = ("model", "role")
        self.replicas = Gauge(
            f"{_P}_replicas", "Replicas serving per role.", role_labels, registry=r
        )
        self.starting = Gauge(
            f"{_P}_replicas_starting", "Replicas ordered, not serving yet.", role_labels, registry=r
        )
        self.draining = Gauge(
            f"{_P}_replicas_draining",
            "Replicas finishing their requests before they stop.",
            role_labels,
            registry=r,
        )
        self.desired = Gauge(
            f"{_P}_desired_replicas", "Replicas the planner decided on.", role_labels, registry=r
        )
        self.decisions = Counter(
            f"{_P}_scaling_decisions",
            "Scale decisions; direction up|down.",
            ("model", "role", "direction"),
            registry=r,
        )
        self.lead_time = Gauge(
            f"{_P}_lead_time_seconds",
            "Time from a scale-up decision to a serving replica (measured, else estimated).",
            role_labels,
            registry=r,
        )
        self.predicted_rate = Gauge(
            f"{_P}_predicted_request_rate", "Predicted requests/s.", ("model",), registry=r
        )
        self.predicted_input = Gauge(
            f"{_P}_predicted_input_tokens", "Predicted mean prompt tokens.", ("model",), registry=r
        )
        self.predicted_output = Gauge(
            f"{_P}_predicted_output_tokens", "Predicted mean output tokens.", ("model",), registry=r
        )
        self.correction = Gauge(
            f"{_P}_correction_factor",
            "Observed / expected latency (ttft, itl) applied to a replica's capacity.",
            ("model", "kind"),
            registry=r,
        )
        self.metrics_up = Gauge(
            f"{_P}_metrics_source_up",
            "1 when the last tick had traffic figures; 0: sizes are held.",
            ("model",),
            registry=r,
        )
        self.cost_rate = Gauge(
            f"{_P}_cost_usd_per_hour",
            "GPU cost per hour of the replicas serving and starting.",
            ("model",),
            registry=r,
        )
        self.cost_total = Counter(
            f"{_P}_cost_usd",
            "GPU cost accumulated since the planner started.",
            ("model",),
            registry=r,
        )
        self.cost_per_mtok = Gauge(
            f"{_P}_cost_per_million_output_tokens_usd",
            "GPU cost per million output tokens over the metrics window.",
            ("model",),
            registry=r,
        )
        for role in roles:
            for gauge in (
                self.replicas,
                self.starting,
                self.draining,
                self.desired,
                self.lead_time,
            ):
                gauge.labels(model, role)
            for direction in ("up", "down"):
                self.decisions.labels(model, role, direction)
        for kind in ("ttft", "itl"):
            self.correction.labels(model, kind).set(1.0)
        per_model = (self.predicted_rate, self.predicted_input, self.predicted_output)
        for metric in (*per_model, self.metrics_up, self.cost_rate, self.cost_total):
            metric.labels(model)
        self.cost_per_mtok.labels(model)

    def record(
        self,
        decision: Decision,
        replicas: dict[str, tuple[int, int, int]],
        *,
        config: PlannerConfig,
        elapsed_s: float,
        output_tokens_rate: float | None,
    ) -> None:
        """``replicas``: role -> (ready, starting, draining) as the connector reported them;
        ``elapsed_s``: time since the previous record (the cost accrued over it)."""
        m = self.model
        cost_rate = 0.0
        for role, d in decision.roles.items():
            ready, starting, draining = replicas.get(role, (0, 0, 0))
            self.replicas.labels(m, role).set(ready)
            self.starting.labels(m, role).set(starting)
            self.draining.labels(m, role).set(draining)
            self.desired.labels(m, role).set(d.target)
            self.lead_time.labels(m, role).set(d.lead_time_s)
            if d.direction is not None:
                self.decisions.labels(m, role, d.direction).inc()
            role_cfg = config.roles[role]
            price = config.prices_usd_per_gpu_hour[role_cfg.instance_type]
            cost_rate += (ready + starting + draining) * role_cfg.gpus_per_replica * price
        self.cost_rate.labels(m).set(cost_rate)
        self.cost_total.labels(m).inc(cost_rate * elapsed_s / 3600.0)
        if output_tokens_rate:
            self.cost_per_mtok.labels(m).set(cost_rate / 3600.0 / output_tokens_rate * 1e6)
        if decision.predicted is not None:
            self.predicted_rate.labels(m).set(decision.predicted.request_rate)
            self.predicted_input.labels(m).set(decision.predicted.input_tokens)
            self.predicted_output.labels(m).set(decision.predicted.output_tokens)
        for kind, value in decision.corrections.items():
            self.correction.labels(m, kind).set(value)
        self.metrics_up.labels(m).set(0 if decision.holding else 1)
