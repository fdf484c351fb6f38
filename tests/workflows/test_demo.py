"""Issue 4's acceptance: the demo publishes SmolLM2 from S3 through the workflow and serves it.

Runs ``strata demo`` in a scratch directory on free ports (local S3, MLflow, frontend), then
checks the endpoint answers, MLflow's REST API shows the promoted version with its evaluation
and benchmark metrics, and the run's saved state shows SmolLM2's round trip through S3 (staged,
checked against the published manifest, verified). The suite's one SmolLM2 publish: the other
tests use the tiny model for the steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.worker.conftest import REPO_ROOT, free_port, wait_healthy
from workflows.local_services import stop_local_services

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


# The whole publish of SmolLM2 took over 10 minutes at load 16 on the 2-core machine (stage 119 s,
# deploy 90 s, evaluate 136 s, ...): the suite's 600 s default is too short for it.
@pytest.mark.timeout(1800)
def test_demo_publishes_and_serves_production(smollm2_dir: Path, tmp_path: Path) -> None:
    port, s3_port, mlflow_port = free_port(), free_port(), free_port()
    log = tmp_path / "demo.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "workflows.cli", "demo", "--port", str(port),
         "--model-dir", str(smollm2_dir), "--s3-port", str(s3_port),
         "--mlflow-port", str(mlflow_port), "--no-prometheus"],
        cwd=tmp_path, stdout=log.open("w"), stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    mlflow = f"http://127.0.0.1:{mlflow_port}"
    try:
        try:
            wait_healthy(url, proc, timeout_s=900)
        except Exception:
            raise AssertionError(log.read_text()[-4000:]) from None
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        answer = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=32,
        )
        assert "Paris" in answer.choices[0].message.content
        alias = httpx.get(
            f"{mlflow}/api/2.0/mlflow/registered-models/alias",
            params={"name": MODEL, "alias": "production"},
        ).json()["model_version"]
        assert alias["source"] == f"s3://strata-models/{MODEL}/"
        run = httpx.get(f"{mlflow}/api/2.0/mlflow/runs/get", params={"run_id": alias["run_id"]})
        metrics = {m["key"]: m["value"] for m in run.json()["run"]["data"]["metrics"]}
        assert metrics["eval_accuracy"] >= 0.8
        assert metrics["bench_ttft_p95_ms"] > 0 and metrics["bench_itl_p95_ms"] > 0
        tags = {t["key"]: t["value"] for t in alias.get("tags", [])}
        assert tags["eval_passed"] == "true" and tags["benchmark_passed"] == "true"
        text = log.read_text()
        for step in ("stage", "verify", "register", "deploy", "evaluate", "benchmark", "promote"):
            assert f"{step}: Succeeded" in text
        # The run's saved state: the whole checkpoint went through S3, every byte checked against
        # the manifest published beside it, and the weights' shapes against config.json.
        (state_path,) = (tmp_path / ".strata" / "runs").glob("local-*.json")
        steps = json.loads(state_path.read_text())["steps"]
        stage, verify = steps["stage"]["outputs"], steps["verify"]["outputs"]
        assert stage["downloaded_bytes"] == stage["total_bytes"] > 500_000_000
        assert verify["manifest_digest"] == stage["manifest_digest"] == tags["manifest_digest"]
        assert verify["checked_published"] is True
        assert verify["architecture"] == "LlamaForCausalLM"
        assert 134_000_000 < verify["num_parameters"] < 136_000_000
        assert "curl -s" in text and "MLflow UI" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        stop_local_services(tmp_path / ".strata" / "local", snapshot=False)
    assert not list((tmp_path / ".strata" / "deployments").glob("*/deployment.json"))
