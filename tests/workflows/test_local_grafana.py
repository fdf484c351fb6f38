"""Grafana in ``strata local up``: started from a binary or a container runtime with the
project's provisioning (datasource = the local Prometheus, the generated dashboards), and a
clear "unavailable" without either.

Grafana is neither a Debian nor a PyPI package, so it cannot run here: a stand-in executable
named ``grafana`` (or ``docker``) on PATH checks the contract a real one relies on (command
line, GF_* settings, the provisioning files it would read) and answers ``/api/health``.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from serving.netutil import free_port
from workflows.local_grafana import (
    CONTAINER_DASHBOARDS,
    CONTAINER_PROVISIONING,
    DASHBOARDS_DIR,
    GRAFANA_IMAGE,
)
from workflows.local_services import local_services_status, start_grafana, stop_local_service

STAND_IN = r'''#!{python}
"""Stand-in for grafana / docker: records how it was started, serves /api/health."""
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
name = os.path.basename(sys.argv[0])
if name == "docker" and sys.argv[1:] == ["info"]:
    sys.exit(0)
env = {{k: v for k, v in os.environ.items() if k.startswith("GF_")}}
if name == "docker":  # settings come as -e KEY=VALUE
    args = sys.argv[1:]
    env.update(dict(a.split("=", 1) for p, a in zip(args, args[1:]) if p == "-e"))
with open({record!r}, "w") as f:
    json.dump({{"argv": sys.argv, "env": env}}, f)
class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{{"database": "ok"}}' if self.path == "/api/health" else b"{{}}"
        self.send_response(200 if self.path == "/api/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
HTTPServer((env["GF_SERVER_HTTP_ADDR"], int(env["GF_SERVER_HTTP_PORT"])), Health).serve_forever()
'''


def install_stand_in(bin_dir: Path, name: str, record: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(STAND_IN.format(python=sys.executable, record=str(record)))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def only_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """PATH holds only a fresh bin directory (no grafana, docker or podman from the machine)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("STRATA_GRAFANA_HOME", str(tmp_path / "grafana-home"))
    return bin_dir


def read_provisioning(directory: Path) -> tuple[dict, dict]:
    datasource = yaml.safe_load((directory / "datasources" / "strata.yaml").read_text())
    dashboards = yaml.safe_load((directory / "dashboards" / "strata.yaml").read_text())
    return datasource["datasources"][0], dashboards["providers"][0]


def test_binary_gets_the_provisioning_and_answers_health(only_path: Path, tmp_path: Path) -> None:
    record = tmp_path / "started.json"
    install_stand_in(only_path, "grafana", record)
    root, port = tmp_path / "local", free_port()
    prometheus = "http://127.0.0.1:19090"
    try:
        url = start_grafana(root, port, prometheus, startup_timeout_s=60)
        assert url == f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/api/health").json() == {"database": "ok"}
        assert local_services_status(root).grafana_url == url
        started = json.loads(record.read_text())
        assert started["argv"][1:] == ["server", "--homepath", str(tmp_path / "grafana-home")]
        env = started["env"]
        assert (env["GF_SERVER_HTTP_ADDR"], env["GF_SERVER_HTTP_PORT"]) == ("127.0.0.1", str(port))
        assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
        datasource, provider = read_provisioning(Path(env["GF_PATHS_PROVISIONING"]))
        assert (datasource["type"], datasource["url"]) == ("prometheus", prometheus)
        assert provider["options"]["path"] == str(DASHBOARDS_DIR)
        dashboards = {p.stem for p in DASHBOARDS_DIR.glob("*.json")}
        assert dashboards >= {"strata-serving", "strata-lifecycle"}
    finally:
        stop_local_service(root, "grafana")
    assert local_services_status(root)["grafana"].state == "stopped"


def test_container_runtime_mounts_the_provisioning(only_path: Path, tmp_path: Path) -> None:
    record = tmp_path / "started.json"
    install_stand_in(only_path, "docker", record)
    root, port = tmp_path / "local", free_port()
    try:
        url = start_grafana(root, port, "http://127.0.0.1:9090", startup_timeout_s=60)
        assert url == f"http://127.0.0.1:{port}"
        argv = json.loads(record.read_text())["argv"]
        assert argv[1:3] == ["run", "--rm"] and argv[-1] == GRAFANA_IMAGE
        mounts = [argv[i + 1] for i, a in enumerate(argv) if a == "-v"]
        provisioning = root.absolute() / "grafana" / "provisioning"
        assert mounts == [f"{provisioning}:{CONTAINER_PROVISIONING}:ro",
                          f"{DASHBOARDS_DIR}:{CONTAINER_DASHBOARDS}:ro"]  # fmt: skip
        assert argv[argv.index("--network") + 1] == "host"
        _, provider = read_provisioning(provisioning)
        assert provider["options"]["path"] == CONTAINER_DASHBOARDS  # the path inside it
    finally:
        stop_local_service(root, "grafana")


def test_without_grafana_or_a_runtime_it_says_where_to_look(
    only_path: Path, tmp_path: Path
) -> None:
    root = tmp_path / "local"
    assert start_grafana(root, free_port(), "http://127.0.0.1:9090") is None
    handle = local_services_status(root)["grafana"]
    assert handle.state == "unavailable"
    assert "docs/observability.md" in handle.detail
    assert not os.path.exists(root / "run" / "grafana.pid")
