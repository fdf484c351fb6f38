"""Fixtures for the workflow steps: a real moto S3 server on loopback, buckets, small models."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from serving.netutil import free_port
from workflows.steps.s3 import make_s3_client


def start_moto(log_path: Path, timeout_s: float = 30.0) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m moto.server`` on a free loopback port, polled until it answers."""
    port = free_port()
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"moto server did not start:\n{log_path.read_text()}")
        time.sleep(0.1)  # poll interval under the deadline


def stop_moto(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of one moto S3 server shared by the session (each test uses its own bucket)."""
    proc, url = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    yield url
    stop_moto(proc)


@dataclass(frozen=True)
class LocalStack:
    """``strata local``'s S3 (moto) and MLflow server (SQLite, artifacts on that S3) under
    ``root``: the registry and lifecycle-fault modules share one, since MLflow's start-up is the
    costliest fixture here (about 50 s at load 20 on the 2-core machine)."""

    root: Path
    s3_port: int
    mlflow_port: int
    s3_url: str
    mlflow_url: str


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    from workflows.local_services import start_local_services, stop_local_services

    root = tmp_path_factory.mktemp("stack") / "local"
    s3_port, mlflow_port = free_port(), free_port()
    try:
        services = start_local_services(
            root, s3_port=s3_port, mlflow_port=mlflow_port, with_prometheus=False,
            startup_timeout_s=300,  # MLflow's start-up on a busy 2-core machine passed 90 s
        )  # fmt: skip
        yield LocalStack(root, s3_port, mlflow_port, services.s3_url, services.mlflow_url)
    finally:
        stop_local_services(root, snapshot=False)


@pytest.fixture
def s3_client(s3_endpoint: str) -> Any:
    return make_s3_client(s3_endpoint)


@pytest.fixture
def bucket(s3_client: Any) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


class GetCounter:
    """Counts the ``GetObject`` calls a boto3 client makes, and the ranged ones apart."""

    def __init__(self, client: Any) -> None:
        self.calls: list[str] = []  # list.append is atomic: the stage's threads share it
        self.ranges: list[tuple[str, str]] = []
        client.meta.events.register("before-call.s3.GetObject", self._on_call)

    @property
    def num_calls(self) -> int:
        return len(self.calls)

    def _on_call(self, params: dict[str, Any], **kwargs: Any) -> None:
        self.calls.append(params["url_path"])
        headers = params.get("headers", {})
        if "Range" in headers:
            self.ranges.append((params["url_path"], headers["Range"]))


@pytest.fixture
def count_gets() -> type[GetCounter]:
    return GetCounter


TINY_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 4,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "float32",
}


def tiny_llama_tensors(config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Random weights in Hugging Face Llama names and shapes for ``config``."""
    rng = np.random.default_rng(0)
    h, v, i = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    d = config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes = {
        "model.embed_tokens.weight": (v, h),
        "lm_head.weight": (v, h),
        "model.norm.weight": (h,),
    }
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


def make_tiny_model(out_dir: Path, **config_overrides: Any) -> Path:
    """A complete tiny Llama checkpoint: config, safetensors weights and a word-level tokenizer.
    ``config_overrides`` change config.json only (the weights keep TINY_CONFIG's shapes)."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tiny_llama_tensors(TINY_CONFIG), str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(TINY_CONFIG | config_overrides, indent=2))
    words = ["<unk>", "<s>", "</s>"] + [f"w{n}" for n in range(40)]
    tokenizer = Tokenizer(models.WordLevel({w: n for n, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama checkpoint (read-only: copy it before changing it)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")
