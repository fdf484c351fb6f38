"""Reads a Hugging Face checkpoint directory: ``config.json`` into ``ModelArchConfig``, weights
from ``*.safetensors`` (single file or sharded with ``model.safetensors.index.json``).

Owns config parsing and file I/O for the weights; never builds modules or touches a device cache.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Defaults of the transformers config classes for fields a config.json may omit.
_MAX_POSITIONS_DEFAULT = {
    "LlamaForCausalLM": 2048,
    "Qwen2ForCausalLM": 32768,
    "MistralForCausalLM": 4096 * 32,
}


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """RoPE frequency parameters. ``factor`` etc. are unused for ``rope_type == "default"``."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True, slots=True)
class ModelArchConfig:
    """Everything the model code needs from ``config.json``, validated once."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    tie_word_embeddings: bool
    # Bias on q/k/v projections; ``o_proj_bias`` on the output projection (Llama ties them,
    # Qwen2 has q/k/v bias only).
    attention_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    # dtype recorded in config.json ("dtype" or legacy "torch_dtype"), None when absent.
    config_dtype: torch.dtype | None


def load_arch_config(model_dir: Path) -> ModelArchConfig:
    """Parse ``model_dir/config.json``. Raises ``ValueError`` naming the file and field."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: no config.json in the checkpoint directory")
    try:
        cfg: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    return parse_arch_config(cfg, source=str(path))


def parse_arch_config(cfg: dict[str, Any], *, source: str = "config.json") -> ModelArchConfig:
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"{source}: field 'architectures'={archs!r} names no supported architecture "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def need(key: str) -> Any:
        if cfg.get(key) is None:
            raise ValueError(f"{source}: required field {key!r} is missing")
        return cfg[key]

    hidden_size = int(need("hidden_size"))
    num_heads = int(need("num_attention_heads"))
    num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"{source}: num_attention_heads={num_heads} is not a multiple of "
            f"num_key_value_heads={num_kv_heads}"
        )
    rope_theta, rope_scaling = _parse_rope(cfg, source)
    qkv_bias = arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False))
    o_bias = arch == "LlamaForCausalLM" and bool(cfg.get("attention_bias", False))
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    dtype_name = cfg.get("dtype") or cfg.get("torch_dtype")
    return ModelArchConfig(
        architecture=arch,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden_size,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=int(cfg.get("head_dim") or hidden_size // num_heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        o_proj_bias=o_bias,
        mlp_bias=arch == "LlamaForCausalLM" and bool(cfg.get("mlp_bias", False)),
        max_model_len=_max_model_len(cfg, arch, source),
        eos_token_ids=eos_ids,
        bos_token_id=cfg.get("bos_token_id"),
        config_dtype=_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None,
    )


def _parse_rope(cfg: dict[str, Any], source: str) -> tuple[float, RopeScaling]:
    """Accept transformers 5's ``rope_parameters`` and the older ``rope_theta``/``rope_scaling``."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: rope type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return theta, RopeScaling()
    if "factor" not in params:
        raise ValueError(f"{source}: rope scaling {rope_type!r} needs field 'factor'")
    if rope_type == "linear":
        return theta, RopeScaling(rope_type="linear", factor=float(params["factor"]))
    for key in ("low_freq_factor", "high_freq_factor"):
        if key not in params:
            raise ValueError(f"{source}: llama3 rope scaling needs field {key!r}")
    original = params.get("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    if original is None:
        raise ValueError(
            f"{source}: llama3 rope scaling needs field 'original_max_position_embeddings'"
        )
    return theta, RopeScaling(
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(original),
    )


def _max_model_len(cfg: dict[str, Any], arch: str, source: str) -> int:
    """``max_position_embeddings``, capped at the sliding window where one is active.

    The engine implements full attention only; within ``sliding_window`` tokens full and
    windowed attention agree, so capping the context keeps outputs exact.
    """
    max_len = int(cfg.get("max_position_embeddings") or _MAX_POSITIONS_DEFAULT[arch])
    windowed = arch == "MistralForCausalLM" or (
        arch == "Qwen2ForCausalLM" and cfg.get("use_sliding_window", False)
    )
    window = cfg.get("sliding_window", 4096) if windowed else None
    if window is not None and int(window) < max_len:
        logger.warning(
            "%s: sliding_window=%d < max_position_embeddings=%d; capping max_model_len at %d "
            "(windowed attention is not implemented)",
            source,
            int(window),
            max_len,
            int(window),
        )
        max_len = int(window)
    return max_len


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files, from the shard index when there is one."""
    model_dir = Path(model_dir)
    index_path = model_dir / _INDEX_FILE
    if index_path.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index_path}: cannot read field 'weight_map': {e}") from e
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index_path}: shard files missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no *.safetensors weight files")
    return files


def iter_weights(
    model_dir: Path, *, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor, cast to ``dtype`` on ``device``."""
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is no mapping)
                yield name, f.get_tensor(name).to(dtype)
