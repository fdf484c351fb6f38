"""``--engine vllm`` command lines and discovery parsers (fast: no vLLM process; the session's
vLLM pool starts from these command lines, so vLLM's own parser checks them there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.frontend.serve import ServeConfig, worker_command
from serving.vllm_engine.discovery import (
    MixedBlockSizeError,
    parse_block_size,
    parse_kv_event_sources,
    pool_block_size,
    reachable_endpoint,
)
from serving.vllm_engine.launcher import (
    VLLMNotFoundError,
    cpu_bind,
    kv_events_config,
    vllm_command,
    vllm_env,
)

# vLLM 0.32's answers, as captured from a running server.
KV_EVENT_SOURCES = {
    "0": {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:18101",
          "replay_endpoint": "tcp://*:18102", "buffer_steps": 10000, "hwm": 100000,
          "max_queue_size": 100000, "topic": ""},
}  # fmt: skip
CACHE_CONFIG_INFO = (
    "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
    "# TYPE vllm:cache_config_info gauge\n"
    'vllm:cache_config_info{block_size="32",cache_dtype="auto",engine="0",'
    'enable_prefix_caching="True",num_gpu_blocks="728",prefix_caching_hash_algo="sha256"} 1.0\n'
)


def test_vllm_command_has_events_details_and_roles(tmp_path: Path) -> None:
    cmd = vllm_command("/py", model_dir=tmp_path, served_model_name="m", port=8001,
                       kv_events_port=5557, extra_args=["--dtype", "auto"])  # fmt: skip
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    events = json.loads(cmd[cmd.index("--kv-events-config") + 1])
    assert events == kv_events_config(5557)
    assert events["endpoint"] == "tcp://*:5557" and events["replay_endpoint"] == "tcp://*:5558"
    assert "--enable-prompt-tokens-details" in cmd
    assert cmd[cmd.index("--block-size") + 1] == "32"
    assert cmd[-2:] == ["--dtype", "auto"]  # the caller's arguments come last and win
    assert "--kv-transfer-config" not in cmd
    prefill = vllm_command("/py", model_dir=tmp_path, served_model_name="m", port=1,
                           kv_events_port=2, role="prefill")  # fmt: skip
    decode = vllm_command("/py", model_dir=tmp_path, served_model_name="m", port=1,
                          kv_events_port=2, role="decode")  # fmt: skip
    roles = [json.loads(c[c.index("--kv-transfer-config") + 1]) for c in (prefill, decode)]
    assert [r["kv_role"] for r in roles] == ["kv_producer", "kv_consumer"]
    assert {r["kv_connector"] for r in roles} == {"NixlConnector"}
    assert {r["kv_buffer_device"] for r in roles} == {"cpu"}
    with pytest.raises(ValueError, match="role"):
        vllm_command("/py", model_dir=tmp_path, served_model_name="m", port=1,
                     kv_events_port=2, role="both-ways")  # fmt: skip


def test_serve_builds_vllm_workers(tmp_path: Path) -> None:
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    cfg = ServeConfig(model_dir=tmp_path, engine="vllm", block_size=32, vllm_python=str(python),
                      worker_args=["--enforce-eager"], served_model_name="m")  # fmt: skip
    cmd = worker_command(cfg, 0, "prefill", 8001, 5557)
    assert cmd[0] == str(python) and cmd[-1] == "--enforce-eager"
    assert "--kv-transfer-config" in cmd and cmd[cmd.index("--served-model-name") + 1] == "m"
    missing = ServeConfig(model_dir=tmp_path, engine="vllm", vllm_python=str(tmp_path / "nope"))
    with pytest.raises(VLLMNotFoundError, match="nope"):
        worker_command(missing, 0, "both", 8001, 5557)


def test_vllm_env_defaults_do_not_override_the_callers() -> None:
    env = vllm_env({"PATH": "/bin"}, index=1, num_workers=2, nixl_side_channel_port=5600,
                   num_cpus=8)  # fmt: skip
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "4-7"
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5600"
    assert env["VLLM_NO_USAGE_STATS"] == "1"
    mine = vllm_env({"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0"}, num_cpus=8)
    assert mine["VLLM_CPU_KVCACHE_SPACE"] == "4" and mine["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert "VLLM_NIXL_SIDE_CHANNEL_PORT" not in mine
    # Workers never share pinned cores: under two cores each, one unpinned thread per worker.
    assert [cpu_bind(i, 2, 2) for i in range(2)] == ["nobind", "nobind"]
    assert [cpu_bind(i, 2, 4) for i in range(2)] == ["0-1", "2-3"]
    assert cpu_bind(2, 2, 4) == "nobind"  # a worker the planner adds
    crowded = vllm_env({}, index=1, num_workers=2, num_cpus=2)
    assert crowded["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and crowded["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in vllm_env({}, num_cpus=8)


def test_kv_event_sources_give_reachable_endpoints() -> None:
    source = parse_kv_event_sources(KV_EVENT_SOURCES, "10.1.2.3")
    assert source is not None
    assert source.endpoint == "tcp://10.1.2.3:18101"
    assert source.replay_endpoint == "tcp://10.1.2.3:18102"
    assert reachable_endpoint("tcp://0.0.0.0:1", "::1") == "tcp://[::1]:1"
    assert reachable_endpoint("tcp://worker-0:1", "h") == "tcp://worker-0:1"
    assert reachable_endpoint("ipc:///tmp/kv", "h") == "ipc:///tmp/kv"
    off = {"0": KV_EVENT_SOURCES["0"] | {"enable_kv_cache_events": False}}
    assert parse_kv_event_sources(off, "h") is None
    assert parse_kv_event_sources({}, "h") is None  # a render-only server
    null = {"0": KV_EVENT_SOURCES["0"] | {"publisher": "null"}}
    assert parse_kv_event_sources(null, "h") is None
    two_ranks = {"1": KV_EVENT_SOURCES["0"] | {"endpoint": "tcp://*:2"}, **KV_EVENT_SOURCES}
    first = parse_kv_event_sources(two_ranks, "h")
    assert first is not None and first.endpoint == "tcp://h:18101"


def test_block_size_from_vllm_metrics_and_mixed_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_block_size(CACHE_CONFIG_INFO) == 32
    assert parse_block_size("# TYPE vllm:num_requests_running gauge\n") is None
    sizes = {"http://a": 32, "http://b": None, "http://c": 16}
    monkeypatch.setattr("serving.vllm_engine.discovery.worker_block_size", sizes.get)
    assert pool_block_size(["http://a", "http://b"], 16) == 32
    assert pool_block_size(["http://b"], 16) == 16
    with pytest.raises(MixedBlockSizeError, match="http://a: 32, http://c: 16"):
        pool_block_size(["http://a", "http://c"], 16)


def test_deploy_step_starts_vllm_for_engine_vllm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workflows.pipeline import PublishParams
    from workflows.steps.deploy import DeployError, _worker_command

    python = tmp_path / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    monkeypatch.setenv("STRATA_VLLM_PYTHON", str(python))
    cmd, env = _worker_command(PublishParams(name="m", engine="vllm"), tmp_path, 8001, 5557)
    assert cmd[:3] == [str(python), "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--served-model-name") + 1] == "m"
    assert env is not None and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    builtin, no_env = _worker_command(PublishParams(name="m"), tmp_path, 8001, 5557)
    assert builtin[1:3] == ["-m", "serving.worker"] and no_env is None
    monkeypatch.setenv("STRATA_VLLM_PYTHON", str(tmp_path / "missing"))
    with pytest.raises(DeployError, match="engine vllm"):
        _worker_command(PublishParams(name="m", engine="vllm"), tmp_path, 8001, 5557)
