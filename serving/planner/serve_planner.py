"""``strata serve --planner [--planner-config FILE]``: the planner in a thread of the serve
process, with the local connector (worker processes of the serve supervisor, drained through the
frontend's admin API) and a direct scrape of the frontend's and workers' ``/metrics``. Its
``strata_planner_*`` series are served on the frontend's ``/metrics``.

Without a file the config comes from the serve flags: the first model, its local roles with
``min_replicas`` = the started count and ``max_replicas`` = four times that, and the profile
``.strata/profiles/<model>.json`` (``strata profile --out`` writes it).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import httpx

from serving.planner.config import ConfigError, PlannerConfig, load_config, parse_config
from serving.planner.connectors.frontend_admin import FrontendAdmin
from serving.planner.connectors.local import LocalConnector
from serving.planner.metrics import PlannerMetrics
from serving.planner.metrics_source import ScrapeSource
from serving.planner.runner import PlannerRunner, build_state

logger = logging.getLogger(__name__)

PROFILES_DIR = Path(".strata/profiles")


def planner_config(serve_config: Any) -> PlannerConfig:
    """The planner config for this ``strata serve``: the file's, with the connector and the
    metrics source pointed at this process; else defaults from the serve flags."""
    url = f"http://{_loopback(serve_config.host)}:{serve_config.port}"
    local = {"connector.kind": "local", "metrics.kind": "scrape", "metrics.frontend_url": url}
    entry = serve_config.entries[0]
    if serve_config.planner_config is not None:
        config = load_config(serve_config.planner_config, local)
        if config.model != entry.name:
            raise ConfigError(
                f"{serve_config.planner_config}: model {config.model!r} is not the first served "
                f"model {entry.name!r}"
            )
        return config
    counts = {"both": entry.num_workers, "prefill": entry.num_prefill, "decode": entry.num_decode}
    roles = {role: {"min_replicas": n, "max_replicas": max(4 * n, n + 1)}
             for role, n in counts.items() if n}  # fmt: skip
    profile = PROFILES_DIR / f"{entry.name}.json"
    if not profile.is_file():
        raise ConfigError(
            f"no planner profile at {profile}: write one with `strata profile --model "
            f"{entry.model_dir} --engine {entry.engine} --out {profile}`, or pass "
            "--planner-config FILE"
        )
    data: dict[str, Any] = {"model": entry.name, "profile": str(profile), "roles": roles}
    for dotted, value in local.items():
        section, key = dotted.split(".")
        data.setdefault(section, {})[key] = value
    return parse_config(data, source="strata serve --planner")


class ServePlanner:
    """Owns the planner thread of a ``strata serve`` process."""

    def __init__(self, runner: PlannerRunner, frontend_url: str) -> None:
        self.runner = runner
        self.frontend_url = frontend_url
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="planner", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        # The first tick after the frontend answers (its workers are registered by then).
        while not self.stop_event.wait(0.2):
            try:
                if httpx.get(f"{self.frontend_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                continue
        if not self.stop_event.is_set():
            self.runner.run(self.stop_event)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)
        self.runner.close()


def start_planner(serve_config: Any, supervisor: Any, state: Any) -> ServePlanner:
    """Build the planner over ``supervisor``'s workers and ``state``'s metrics; start it."""
    config = planner_config(serve_config)
    if serve_config.api_key and not serve_config.admin_key:
        raise ConfigError("--planner with --api-key needs --admin-key: it drains workers "
                          "through the frontend's admin API")  # fmt: skip
    url = config.metrics.frontend_url
    first = serve_config.entries[0].name
    initial = [w for w in supervisor.workers if w.model == first]
    connector = LocalConnector(
        supervisor,
        FrontendAdmin(url, serve_config.admin_key),
        tuple(config.roles),
        model=first,
        drain=config.connector.drain,
        initial=initial,
        startup_timeout_s=serve_config.startup_timeout_s,
    )
    metrics = PlannerMetrics(config.model, tuple(config.roles))
    state.extra_registries.append(metrics.registry)
    source = ScrapeSource(config.metrics, config.model, serve_config.admin_key)
    runner = PlannerRunner(config, build_state(config), connector, source, metrics)
    planner = ServePlanner(runner, url)
    planner.start()
    logger.info("planner: %s, roles %s, interval %.0f s", config.mode, ", ".join(config.roles),
                config.scaling.interval_s)  # fmt: skip
    return planner


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
