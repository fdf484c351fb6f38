"""Checkpoint loading: config.json parsing, RoPE parameters, weight files and their errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, rotate_half

from serving.engine.layers.rotary import RotaryEmbedding, apply_rotary, compute_inv_freq
from serving.engine.model_runner import ModelRunner, load_model
from serving.engine.models.loader import (
    ModelArchConfig,
    RopeScaling,
    load_arch_config,
    parse_arch_config,
    weight_files,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _base(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    cfg.update(overrides)
    return cfg


def _write(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def _hf_llama(**kwargs: Any) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **kwargs,
    )
    return LlamaForCausalLM(config).eval()


def test_transformers_checkpoint_parses(tmp_path: Path) -> None:
    _hf_llama(
        rope_parameters=dict(LLAMA3_ROPE), tie_word_embeddings=True, eos_token_id=[5, 7]
    ).save_pretrained(tmp_path)
    arch = load_arch_config(tmp_path)
    assert arch == ModelArchConfig(
        architecture="LlamaForCausalLM",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64),
        tie_word_embeddings=True,
        attention_bias=False,
        o_proj_bias=False,
        mlp_bias=False,
        max_model_len=256,
        eos_token_ids=(5, 7),
        bos_token_id=1,
        config_dtype=torch.float32,
    )


def test_legacy_rope_theta_and_rope_scaling() -> None:
    linear = parse_arch_config(
        _base(
            rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0}, torch_dtype="bfloat16"
        )
    )
    assert linear.rope_theta == 1e6
    assert linear.rope_scaling == RopeScaling("linear", 2.0)
    assert linear.config_dtype == torch.bfloat16
    llama3 = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    legacy = parse_arch_config(_base(rope_theta=500000.0, rope_scaling=llama3))
    assert legacy.rope_theta == 500000.0 and legacy.rope_scaling.rope_type == "llama3"
    assert parse_arch_config(_base()).rope_theta == 10000.0


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        LLAMA3_ROPE,
    ],
    ids=["default", "linear", "llama3"],
)
def test_rope_matches_transformers_bit_for_bit(rope: dict[str, Any]) -> None:
    hf_config = _hf_llama(rope_parameters=dict(rope)).config
    arch = parse_arch_config(_base(rope_parameters=dict(rope)))
    ours = compute_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling)
    if rope["rope_type"] == "default":
        expected = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config)[0]
    else:
        expected = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config, "cpu")[0]
    assert torch.equal(ours, expected)
    positions = torch.arange(300)
    cos, signed_sin = RotaryEmbedding(arch.head_dim, arch.rope_theta, arch.rope_scaling)(
        positions, torch.float32
    )
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_config)(torch.zeros(1), positions[None])
    assert torch.equal(cos[:, 0], hf_cos[0])
    x = torch.randn(300, 3, arch.head_dim)
    hf_rotated = x * hf_cos[0][:, None] + rotate_half(x) * hf_sin[0][:, None]
    assert torch.equal(apply_rotary(x, cos, signed_sin), hf_rotated)


def test_qwen2_and_mistral_fields(caplog: pytest.LogCaptureFixture) -> None:
    qwen = parse_arch_config(
        _base(architectures=["Qwen2ForCausalLM"], sliding_window=32, use_sliding_window=False)
    )
    assert qwen.attention_bias and not qwen.o_proj_bias
    assert qwen.max_model_len == 256
    with caplog.at_level(logging.WARNING):
        mistral = parse_arch_config(
            _base(architectures=["MistralForCausalLM"], sliding_window=128, head_dim=32)
        )
    assert mistral.max_model_len == 128 and mistral.head_dim == 32
    assert "sliding_window=128" in caplog.text
    no_window = parse_arch_config(_base(architectures=["MistralForCausalLM"], sliding_window=None))
    assert no_window.max_model_len == 256
    windowed_qwen = parse_arch_config(
        _base(architectures=["Qwen2ForCausalLM"], sliding_window=32, use_sliding_window=True)
    )
    assert windowed_qwen.max_model_len == 32


def test_llama_attention_bias_covers_output_projection() -> None:
    arch = parse_arch_config(_base(attention_bias=True, mlp_bias=True))
    assert arch.attention_bias and arch.o_proj_bias and arch.mlp_bias


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "field 'architectures'"),
        ({"hidden_size": None}, "required field 'hidden_size'"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
        ({"rope_parameters": {"rope_type": "linear"}}, "needs field 'factor'"),
        (
            {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}},
            "needs field 'low_freq_factor'",
        ),
    ],
)
def test_bad_config_names_file_and_field(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    path = _write(tmp_path, _base(**overrides))
    with pytest.raises(ValueError, match=message) as info:
        load_arch_config(path)
    assert str(path / "config.json") in str(info.value)


def test_missing_files_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no config\.json"):
        load_arch_config(tmp_path)
    _write(tmp_path, _base())
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        weight_files(tmp_path)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"shard files missing: .*model-00001-of-00002"):
        weight_files(tmp_path)


def test_sharded_checkpoint_loads_every_shard(tmp_path: Path) -> None:
    hf = _hf_llama(tie_word_embeddings=False)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    files = weight_files(tmp_path)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert sorted(files) == sorted(tmp_path.glob("*.safetensors"))
    model = load_model(tmp_path, load_arch_config(tmp_path), torch.float32, torch.device("cpu"))
    ours = dict(model.named_parameters())
    hf_state = hf.state_dict()
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    for name, param in ours.items():
        module, _, kind = name.rpartition(".")
        owner, _, leaf = module.rpartition(".")
        prefix = f"{owner}." if owner else ""
        parts = [f"{prefix}{p}.{kind}" for p in fused.get(leaf, (leaf,))]
        assert torch.equal(param, torch.cat([hf_state[p] for p in parts])), name
    assert len(ours) == len(hf_state) - 3 * 2  # q/k/v -> qkv and gate/up -> gate_up, 2 layers


def test_missing_or_unexpected_tensors_raise(tmp_path: Path) -> None:
    hf = _hf_llama(tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    arch = load_arch_config(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"lacks tensors: lm_head\.weight"):
        load_model(tmp_path, arch, torch.float32, torch.device("cpu"))
    save_file({"model.extra.weight": torch.zeros(2)}, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match=r"'model\.extra\.weight' matches no model parameter"):
        load_model(tmp_path, arch, torch.float32, torch.device("cpu"))


def test_tied_embeddings_share_one_tensor(tmp_path: Path) -> None:
    _hf_llama(tie_word_embeddings=True).save_pretrained(tmp_path)
    model = ModelRunner(tmp_path, num_blocks=2).model
    assert model.lm_head is None
    hidden = torch.randn(3, 64)
    embed = model.model.embed_tokens.weight
    assert torch.equal(model.compute_logits(hidden), torch.nn.functional.linear(hidden, embed))
