"""The start-up hook of vLLM processes with a NIXL connector (``serving/nixl_site``).

NIXL's Python wrapper builds every agent with ``pthrDelay = 0`` and its UCX progress thread then
takes a whole core per idle vLLM worker; the hook makes the wrapper pass Strata's delay instead.
These tests run a fresh Python (this environment's NIXL: the same wrapper vLLM's environment
has) with and without the hook on its ``PYTHONPATH`` and look at what reaches NIXL's native
``nixlAgent`` and at the CPU an idle agent uses. No vLLM process: fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving.nixl_site.sitecustomize import DELAY_ENV
from serving.vllm_engine.launcher import NIXL_SITE_DIR, vllm_env

pytest.importorskip("nixl._api", reason="NIXL is not installed (make install brings nixl)")

# What NIXL's native agent is given, recorded on the way in (the agent is still built).
RECORD_CONFIG = """
import json, time
import nixl._api as api
seen = []
native = api.nixlBind.nixlAgent
def recording(name, config):
    seen.append(config.pthrDelay)
    return native(name, config)
api.nixlBind.nixlAgent = recording
agent = api.nixl_agent("probe", api.nixl_agent_config(backends=["UCX"]))
started_cpu_s, started_s = time.process_time(), time.monotonic()
time.sleep(1.0)  # a window to measure the idle agent's CPU in, not a wait for anything
cpu_share = (time.process_time() - started_cpu_s) / (time.monotonic() - started_s)
print(json.dumps({"pthr_delay": seen, "cpu_share": cpu_share}))
"""


def _run(pythonpath: list[Path], env_extra: dict[str, str] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", DELAY_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    env.update(env_extra or {})
    done = subprocess.run([sys.executable, "-c", RECORD_CONFIG], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_hook_gives_nixl_a_progress_delay_and_the_idle_agent_sleeps() -> None:
    hooked = _run([NIXL_SITE_DIR])
    assert hooked["pthr_delay"] == [100]
    # The busy-polling thread alone would be ~1.0 (a whole core); measured 0.02-0.03 hooked.
    assert hooked["cpu_share"] < 0.3
    assert _run([NIXL_SITE_DIR], {DELAY_ENV: "250"})["pthr_delay"] == [250]


def test_without_the_hook_nixl_polls_without_pause() -> None:
    assert _run([])["pthr_delay"] == [0]  # what the hook is for; the wrapper fixes 0
    assert _run([NIXL_SITE_DIR], {DELAY_ENV: "0"})["pthr_delay"] == [0]  # switched off


def test_a_sitecustomize_later_on_the_path_still_runs(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['SEEN_NEXT'] = '1'\n")
    code = "import os; print(os.environ.get('SEEN_NEXT'))"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(NIXL_SITE_DIR), str(tmp_path)])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    assert done.stdout.strip() == "1"


def test_vllm_workers_with_a_nixl_connector_get_the_hook() -> None:
    env = vllm_env({"PYTHONPATH": "/mine"}, nixl_side_channel_port=5600, num_cpus=8)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(NIXL_SITE_DIR), "/mine"]
    assert env[DELAY_ENV] == "100"
    assert vllm_env({DELAY_ENV: "7"}, nixl_side_channel_port=5600)[DELAY_ENV] == "7"
    aggregated = vllm_env({}, num_cpus=8)  # no connector: nothing to hook
    assert "PYTHONPATH" not in aggregated and DELAY_ENV not in aggregated


def test_strata_transport_agents_get_the_delay_through_the_same_helper(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import nixl._api as api

    from serving.transfer.nixl_transport import _make_agent

    seen: list[int] = []
    native = api.nixlBind.nixlAgent

    def recording(name: str, config: object) -> object:
        seen.append(config.pthrDelay)  # type: ignore[attr-defined]
        return native(name, config)

    monkeypatch.setattr(api.nixlBind, "nixlAgent", recording)
    _make_agent("probe-delay", "UCX", 100)
    _make_agent("probe-no-delay", "UCX", 0)
    assert seen == [100, 0]
    assert api.nixlBind.nixlAgentConfig.__name__ == "nixlAgentConfig"  # swapped back
