"""``PlannerConfig``: the planner's one settings object, parsed once from YAML (``extra="forbid"``
at every level, so a misspelt key is an error naming it) and passed down.

A minimal file::

    model: llama-3-8b
    profile: profiles/llama-3-8b-h100.json
    roles:
      decode: {min_replicas: 1, max_replicas: 8}
      prefill: {min_replicas: 1, max_replicas: 4}

Everything else has a default; ``docs/planner.md`` lists every key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Role = Literal["prefill", "decode", "both"]
ROLES: tuple[Role, ...] = ("prefill", "decode", "both")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SlaConfig(_Strict):
    ttft_s: float = Field(default=2.0, gt=0, description="Time to first token target.")
    itl_s: float = Field(default=0.05, gt=0, description="Inter-token latency target.")


class LeadTimeConfig(_Strict):
    """Time from a scale-up decision to a serving replica: node + weights + warm-up.

    ``weights_s`` is read from MLflow (the publish run's ``stage_duration_s`` +
    ``deploy_duration_s``) when ``mlflow`` is set; the configured value is the fallback.
    Measured scale-ups then replace the estimate (an average over the last few).
    """

    node_provisioning_s: float = Field(
        default=90.0, ge=0, description="New GPU node (Karpenter: launch, join, GPU plug-in)."
    )
    weights_s: float = Field(default=60.0, ge=0, description="Stage and load the weights.")
    warmup_s: float = Field(default=20.0, ge=0, description="Engine start-up and warm-up.")
    use_measured: bool = Field(
        default=True, description="Replace the estimate by measured scale-up times."
    )
    mlflow_tracking_uri: str | None = None
    mlflow_model: str | None = Field(default=None, description="Registered model name.")
    mlflow_version: str | None = Field(
        default=None, description="A version number, or an alias (default 'production')."
    )
    include_stage: bool = Field(
        default=False, description="Count the S3 -> cache staging too (a node-local cache)."
    )

    @property
    def estimate_s(self) -> float:
        return self.node_provisioning_s + self.weights_s + self.warmup_s


class RoleConfig(_Strict):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=8, ge=1)
    gpus_per_replica: int = Field(default=1, ge=1)
    max_gpus: int | None = Field(default=None, ge=1, description="GPU budget of this role.")
    instance_type: str = Field(default="default", description="Key into prices_usd_per_gpu_hour.")
    lead_time: LeadTimeConfig = Field(default_factory=LeadTimeConfig)

    @model_validator(mode="after")
    def _check(self) -> RoleConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if self.max_gpus is not None and self.min_replicas * self.gpus_per_replica > self.max_gpus:
            raise ValueError("min_replicas * gpus_per_replica exceeds max_gpus")
        return self

    @property
    def replica_limit(self) -> int:
        """``max_replicas``, lowered by the role's GPU budget."""
        if self.max_gpus is None:
            return self.max_replicas
        return min(self.max_replicas, self.max_gpus // self.gpus_per_replica)


class PredictorConfig(_Strict):
    kind: Literal["constant", "moving_average", "holt", "holt_winters"] = "holt"
    window_s: float = Field(
        default=1800.0,
        gt=0,
        description="History the predictor fits on (30 buckets: 10 gave Holt a noisy trend "
        "that over- and undershot in the day study, docs/benchmarks.md).",
    )
    bucket_s: float = Field(default=60.0, gt=0, description="Observations are averaged per bucket.")
    season_s: float = Field(default=86_400.0, gt=0, description="holt_winters: the cycle.")
    damped_trend: bool = True
    quantile: float | None = Field(
        default=0.8,
        gt=0.5,
        lt=1,
        description="Size for this quantile of the load predicted a lead time ahead (Holt's "
        "prediction interval widens with the horizon); null: the point forecast.",
    )


class ScalingConfig(_Strict):
    interval_s: float = Field(default=10.0, gt=0, description="Fast loop: one tick.")
    model_interval_s: float = Field(
        default=60.0, gt=0, description="Slow loop: re-size from the predicted load."
    )
    lookahead: Literal["lead_time", "none"] = Field(
        default="lead_time",
        description="lead_time: size for the peak predicted until a replica ordered now serves;"
        " none: size for the current load (a reactive planner).",
    )
    target_utilization: float = Field(default=0.85, gt=0, le=1)
    tolerance: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="No re-size for a load within this share of the current size (up only "
        "while the utilisation target, not the SLA, bounds a replica).",
    )
    scale_down_tolerance: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="No scale-down for a load within this share below the current size "
        "(null: ``tolerance``); widens the band down without widening it up.",
    )
    sqrt_headroom: float = Field(
        default=0.0,
        ge=0,
        description="Square-root staffing (Halfin-Whitt's beta): a pool that grows for a "
        "predicted load of a replicas gets ceil(a + sqrt_headroom * sqrt(a)), a margin the size "
        "of the load's Poisson fluctuations, relatively larger on a small pool; the tolerance "
        "bands still compare a with the current size (0: none; target_utilization is the "
        "margin in proportion to the load). docs/planner.md: measured, not the default.",
    )
    max_step_up: int = Field(default=4, ge=1, description="Replicas added per role per tick.")
    max_step_down: int = Field(default=1, ge=1, description="Replicas removed per role per tick.")
    scale_down_stabilization_s: float = Field(
        default=300.0, ge=0, description="Scale down to the highest target seen in this window."
    )
    queue_per_replica_up: float = Field(
        default=4.0, gt=0, description="Fast loop: waiting requests per replica that add one."
    )
    queue_ticks_up: int = Field(default=2, ge=1, description="... for this many ticks in a row.")
    min_requests_for_correction: int = Field(default=20, ge=1)
    correction_smoothing: float = Field(
        default=0.02,
        gt=0,
        le=1,
        description="Weight of each tick's observed/expected latency ratio in the correction "
        "factor (an exponential average: a time constant of about interval_s / this, 500 s "
        "by default): a slow calibration of the profile. A fast one (0.3, the default until "
        "2026-12-07) chases the ratio's rise near a replica's rating and makes the pool swing; "
        "docs/benchmarks.md, 'The best schedule with hindsight'.",
    )
    correction_applies_to: Literal["capacity", "latency"] = Field(
        default="capacity",
        description="capacity: a replica sustains 1/correction of the model's rate; latency: "
        "the model's TTFT and ITL are scaled by the correction and a replica sustains the "
        "highest rate whose corrected latencies meet the SLA (capped at target_utilization), "
        "so latencies far inside the SLA cost nothing (Dynamo's use; where no rate meets the "
        "corrected SLA, the utilization cap, as for an SLA the model calls infeasible). "
        "docs/planner.md: measured, not the default.",
    )


class MetricsSourceConfig(_Strict):
    kind: Literal["prometheus", "scrape"] = "scrape"
    prometheus_url: str | None = None
    frontend_url: str = Field(
        default="http://127.0.0.1:8000", description="scrape: the frontend's base URL."
    )
    window_s: float = Field(default=60.0, gt=0, description="Rates and percentiles over this.")
    timeout_s: float = Field(default=5.0, gt=0)


class KubernetesConfig(_Strict):
    namespace: str = "default"
    in_cluster: bool = Field(default=True, description="Service account; else kubeconfig.")
    kubeconfig: Path | None = None
    context: str | None = None
    extra_selector: str = Field(default="", description="More labels, e.g. strata.dev/model=x.")


class DrainConfig(_Strict):
    deadline_s: float = Field(
        default=120.0, gt=0, description="Then the worker stops; its streams migrate."
    )
    poll_s: float = Field(default=1.0, gt=0)


class ConnectorConfig(_Strict):
    kind: Literal["local", "kubernetes", "virtual"] = "local"
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    drain: DrainConfig = Field(default_factory=DrainConfig)


class PlannerConfig(_Strict):
    model: str = Field(description="Served model name (the metrics' model label).")
    profile: Path = Field(description="Profile JSON from `strata profile`.")
    mode: Literal["act", "advisory"] = Field(
        default="act", description="advisory: log decisions, change nothing."
    )
    sla: SlaConfig = Field(default_factory=SlaConfig)
    roles: dict[Role, RoleConfig] = Field(min_length=1)
    max_total_gpus: int | None = Field(default=None, ge=1, description="Budget over all roles.")
    prices_usd_per_gpu_hour: dict[str, float] = Field(
        default_factory=lambda: {"default": 4.0},
        description="Price of one GPU-hour per instance type.",
    )
    predictor: PredictorConfig = Field(default_factory=PredictorConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    metrics: MetricsSourceConfig = Field(default_factory=MetricsSourceConfig)
    connector: ConnectorConfig = Field(default_factory=ConnectorConfig)
    kv_transfer_s: float = Field(
        default=0.0, ge=0, description="Disaggregated: KV pull time counted in TTFT."
    )
    metrics_port: int | None = Field(
        default=9464, description="`strata planner` serves /metrics here (None: off)."
    )

    @model_validator(mode="after")
    def _check(self) -> PlannerConfig:
        roles = set(self.roles)
        if roles not in ({"both"}, {"prefill", "decode"}, {"prefill", "decode", "both"}):
            raise ValueError(
                "roles must be 'both' (aggregated), 'prefill' and 'decode' (disaggregated), "
                f"or all three; got {sorted(roles)}"
            )
        for role, cfg in self.roles.items():
            if cfg.instance_type not in self.prices_usd_per_gpu_hour:
                raise ValueError(
                    f"roles.{role}.instance_type {cfg.instance_type!r} has no price in "
                    "prices_usd_per_gpu_hour"
                )
        if self.max_total_gpus is not None:
            floor = sum(c.min_replicas * c.gpus_per_replica for c in self.roles.values())
            if floor > self.max_total_gpus:
                raise ValueError(f"the roles' minimums need {floor} GPUs > max_total_gpus")
        if self.metrics.kind == "prometheus" and not self.metrics.prometheus_url:
            raise ValueError("metrics.kind prometheus needs metrics.prometheus_url")
        return self


class ConfigError(ValueError):
    """The planner config file is unreadable or invalid; the message names the file and key."""


def load_config(path: Path, overrides: dict | None = None) -> PlannerConfig:
    """Parse ``path`` (YAML) and apply ``overrides`` (dotted keys, e.g. ``{"mode": ...}``)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read planner config {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"planner config {path} is not YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"planner config {path}: expected a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    if "profile" in data and not Path(data["profile"]).is_absolute():
        data["profile"] = str(Path(path).parent / data["profile"])
    return parse_config(data, source=str(path))


def parse_config(data: dict, source: str = "planner config") -> PlannerConfig:
    try:
        return PlannerConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"{source}: {where}: {first['msg']}") from exc
