"""Grafana for ``strata local up``: the project's dashboards over the local Prometheus.

Grafana is not a Debian or PyPI package, so it runs only where the machine has it: a
``grafana`` (or older ``grafana-server``) binary on PATH, or else a container runtime (docker or
podman) that answers ``info``. Its provisioning is written under ``<root>/grafana/``:

    provisioning/datasources/strata.yaml   Prometheus at the local Prometheus's URL (default)
    provisioning/dashboards/strata.yaml    file provider: the repository's grafana/dashboards/*.json
    data/, logs/                           Grafana's own state (binary only)

Anonymous viewers are allowed (a loopback demo); ``admin``/``admin`` edits. Builds the command
line and the files; ``workflows.local_services`` starts, probes and stops the process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

DASHBOARDS_DIR = Path(__file__).resolve().parents[1] / "grafana" / "dashboards"
# Pinned so a demo is reproducible; Grafana OSS, Apache-licensed image of the server.
GRAFANA_IMAGE = "docker.io/grafana/grafana-oss:11.3.0"
CONTAINER_PROVISIONING = "/etc/strata/grafana/provisioning"
CONTAINER_DASHBOARDS = "/etc/strata/grafana/dashboards"
HEALTH_PATH = "/api/health"
UNAVAILABLE = (
    "skipped: no grafana binary on PATH and no usable container runtime "
    "(docs/observability.md gives the one command that starts it)"
)


@dataclass(frozen=True)
class GrafanaLaunch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    how: str = "binary"  # binary | container


def find_launcher() -> tuple[str, str] | None:
    """("binary", path) for a Grafana binary, ("container", runtime) for a working docker or
    podman, or None."""
    for name in ("grafana", "grafana-server"):
        path = shutil.which(name)
        if path:
            return "binary", path
    for runtime in ("docker", "podman"):
        path = shutil.which(runtime)
        if path and _answers(path):
            return "container", path
    return None


def _answers(runtime: str) -> bool:
    """The runtime's daemon (or podman itself) works: ``info`` succeeds within 10 s."""
    try:
        done = subprocess.run(
            [runtime, "info"], capture_output=True, timeout=10, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def write_provisioning(root: Path, prometheus_url: str, dashboards_path: str) -> Path:
    """The datasource and dashboard provider files; returns the provisioning directory."""
    provisioning = root / "grafana" / "provisioning"
    (provisioning / "datasources").mkdir(parents=True, exist_ok=True)
    (provisioning / "dashboards").mkdir(parents=True, exist_ok=True)
    datasource = {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "Strata Prometheus",
                "uid": "strata-prometheus",
                "type": "prometheus",
                "access": "proxy",
                "url": prometheus_url,
                "isDefault": True,
                "editable": False,
                "jsonData": {"timeInterval": "5s"},  # the local scrape interval
            }
        ],
    }
    provider = {
        "apiVersion": 1,
        "providers": [
            {
                "name": "strata",
                "orgId": 1,
                "folder": "Strata",
                "type": "file",
                "allowUiUpdates": False,
                "updateIntervalSeconds": 30,
                "options": {"path": dashboards_path},
            }
        ],
    }
    # JSON is YAML: Grafana reads these as its provisioning YAML.
    (provisioning / "datasources" / "strata.yaml").write_text(json.dumps(datasource, indent=2))
    (provisioning / "dashboards" / "strata.yaml").write_text(json.dumps(provider, indent=2))
    return provisioning


def grafana_launch(root: Path, port: int, prometheus_url: str) -> GrafanaLaunch | None:
    """How to run Grafana on 127.0.0.1:``port`` with the provisioning written here; None when
    this machine has neither a Grafana binary nor a container runtime."""
    found = find_launcher()
    if found is None:
        return None
    how, path = found
    settings = {
        "GF_SERVER_HTTP_ADDR": "127.0.0.1",
        "GF_SERVER_HTTP_PORT": str(port),
        "GF_AUTH_ANONYMOUS_ENABLED": "true",
        "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
        "GF_ANALYTICS_REPORTING_ENABLED": "false",
        "GF_ANALYTICS_CHECK_FOR_UPDATES": "false",
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": "",
    }
    if how == "binary":
        provisioning = write_provisioning(root, prometheus_url, str(DASHBOARDS_DIR))
        env = settings | {
            "GF_PATHS_PROVISIONING": str(provisioning),
            "GF_PATHS_DATA": str(root / "grafana" / "data"),
            "GF_PATHS_LOGS": str(root / "grafana" / "logs"),
        }
        home = grafana_home(Path(path))
        server = [path, "server"] if Path(path).name == "grafana" else [path]
        return GrafanaLaunch([*server, "--homepath", str(home)], env, "binary")
    provisioning = write_provisioning(root, prometheus_url, CONTAINER_DASHBOARDS)
    env_args = [arg for key, value in settings.items() for arg in ("-e", f"{key}={value}")]
    argv = [
        path, "run", "--rm", "--name", f"strata-grafana-{port}", "--network", "host",
        "-v", f"{provisioning}:{CONTAINER_PROVISIONING}:ro",
        "-v", f"{DASHBOARDS_DIR}:{CONTAINER_DASHBOARDS}:ro",
        "-e", f"GF_PATHS_PROVISIONING={CONTAINER_PROVISIONING}",
        *env_args, GRAFANA_IMAGE,
    ]  # fmt: skip
    return GrafanaLaunch(argv, {}, "container")


def grafana_home(binary: Path) -> Path:
    """Grafana's home (its ``public/`` and ``conf/``): $STRATA_GRAFANA_HOME, the Debian/RPM
    package's /usr/share/grafana, or the directory above the binary's bin/ (the tarball)."""
    if os.environ.get("STRATA_GRAFANA_HOME"):
        return Path(os.environ["STRATA_GRAFANA_HOME"])
    packaged = Path("/usr/share/grafana")
    if packaged.is_dir():
        return packaged
    return binary.resolve().parent.parent
