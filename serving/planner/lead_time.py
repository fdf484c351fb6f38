"""The lead time's starting estimate: node provisioning (configured: Karpenter's launch, join
and GPU device plug-in) + weights (the publish workflow's measurements in MLflow for the served
model version) + warm-up (configured). Once replicas come up, the core replaces it with what it
measures (``PlannerState.lead_time_s``).

The publish workflow's deploy step logs ``deploy_duration_s`` on the version's run (the worker
loading the weights from the model cache until it serves); ``stage_duration_s`` (S3 to the
cache), when a version's run has it, counts too if ``include_stage`` (a node that must fill a
local cache from S3 first). The largest value logged counts: a deploy that found its workers
already running logs a few milliseconds.
"""

from __future__ import annotations

import logging

from serving.planner.config import LeadTimeConfig, PlannerConfig, Role

logger = logging.getLogger(__name__)


def recorded_weights_s(config: LeadTimeConfig) -> tuple[float | None, str]:
    """Seconds to stage and load the version's weights as MLflow recorded them, and where from;
    ``(None, why)`` when MLflow is not configured or holds nothing for the version."""
    if not (config.mlflow_tracking_uri and config.mlflow_model):
        return None, "MLflow not configured"
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri, name = config.mlflow_tracking_uri, config.mlflow_model
    ref = config.mlflow_version or "production"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        if ref.isdigit():
            version = client.get_model_version(name, ref)
        else:
            version = client.get_model_version_by_alias(name, ref)
        keys = ["deploy_duration_s"] + (["stage_duration_s"] if config.include_stage else [])
        total, found = 0.0, []
        for key in keys:
            values = [m.value for m in client.get_metric_history(version.run_id, key)]
            if values:
                total += max(values)
                found.append(f"{key} {max(values):.0f} s")
    except MlflowException as exc:
        return None, f"MLflow {uri}: model {name} {ref}: {exc.message}"
    if not found:
        return None, f"model {name} version {version.version} has no deploy_duration_s yet"
    return total, f"MLflow, model {name} version {version.version}: " + ", ".join(found)


def initial_lead_times(config: PlannerConfig) -> dict[Role, float]:
    """Per role: node + weights (MLflow, else the configured value) + warm-up."""
    out: dict[Role, float] = {}
    for role, role_cfg in config.roles.items():
        lead = role_cfg.lead_time
        weights_s, source = recorded_weights_s(lead)
        if weights_s is None:
            logger.info("planner: %s weights time %.0f s (configured; %s)", role, lead.weights_s,
                        source)  # fmt: skip
            weights_s = lead.weights_s
        else:
            logger.info("planner: %s weights time %.0f s (%s)", role, weights_s, source)
        out[role] = lead.node_provisioning_s + weights_s + lead.warmup_s
    return out
