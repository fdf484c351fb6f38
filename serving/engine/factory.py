"""Build an engine (real or mock) and the model's tokenizer from an ``EngineConfig``."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.engine.config import EngineConfig
from serving.engine.core import EngineCore
from serving.engine.scheduler import SchedulerConfig
from serving.engine.timing import MockModelRunner, TimingProfile

logger = logging.getLogger(__name__)

_MOCK_DEFAULT_NUM_BLOCKS = 8192
_MOCK_DEFAULT_MAX_MODEL_LEN = 32_768


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the API layer needs about the served model."""

    name: str
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int


@dataclass(slots=True)
class LoadedEngine:
    core: EngineCore
    info: ModelInfo
    tokenizer: Any | None  # transformers PreTrainedTokenizerBase, None for a token-id-only mock


def load_tokenizer(model_dir: Path) -> Any:
    """The checkpoint's own tokenizer and chat template (transformers)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:
        raise ValueError(f"cannot load the tokenizer from {model_dir}: {exc}") from exc


def generation_eos_ids(model_dir: Path) -> tuple[int, ...]:
    """EOS ids from ``generation_config.json`` (may list several, e.g. Llama-3's <|eot_id|>)."""
    path = Path(model_dir) / "generation_config.json"
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return ()
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def build_engine(config: EngineConfig, served_model_name: str | None = None) -> LoadedEngine:
    model_dir = Path(config.model_dir) if config.model_dir is not None else None
    name = served_model_name or (model_dir.name if model_dir is not None else "mock")
    tokenizer = load_tokenizer(model_dir) if model_dir is not None else None
    if config.engine == "builtin":
        from serving.engine.model_runner import ModelRunner

        assert model_dir is not None
        runner = ModelRunner(
            model_dir,
            device=config.device,
            dtype=config.dtype,
            block_size=config.block_size,
            num_blocks=config.num_blocks,
            kv_cache_bytes=config.kv_cache_bytes,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_num_batched_tokens=config.max_num_batched_tokens,
            load_format=config.load_format,
            max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len,
            kernels=config.kernels,
            enforce_eager=config.enforce_eager,
        )
        arch = runner.arch
        max_len = min(config.max_model_len or arch.max_model_len, arch.max_model_len)
        eos_ids = tuple(dict.fromkeys(arch.eos_token_ids + generation_eos_ids(model_dir)))
        vocab_size = arch.vocab_size
        executor: Any = runner
    else:
        vocab_size, max_len, eos_ids = _mock_model_facts(config, model_dir, tokenizer)
        executor = MockModelRunner(
            vocab_size=vocab_size,
            num_blocks=config.num_blocks or _MOCK_DEFAULT_NUM_BLOCKS,
            block_size=config.block_size,
            kv_bytes_per_token=config.kv_bytes_per_token or 131_072,
            profile=TimingProfile.from_json(config.timing_profile)
            if config.timing_profile
            else None,
            speedup=config.speedup,
            excluded_token_ids=eos_ids,
            seed=config.seed,
        )
    scheduler_config = SchedulerConfig(
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=max_len,
    )
    core = EngineCore(
        executor,
        scheduler_config,
        enable_prefix_caching=config.enable_prefix_caching,
        kv_lease_s=config.kv_lease_s,
    )
    info = ModelInfo(
        name=name,
        max_model_len=core.limits.max_model_len,
        eos_token_ids=eos_ids,
        vocab_size=vocab_size,
    )
    logger.info(
        "engine %s ready: model %s, %d KV blocks of %d tokens, max_model_len %d",
        config.engine,
        name,
        core.limits.num_blocks,
        core.limits.block_size,
        info.max_model_len,
    )
    return LoadedEngine(core=core, info=info, tokenizer=tokenizer)


def _mock_model_facts(
    config: EngineConfig, model_dir: Path | None, tokenizer: Any | None
) -> tuple[int, int, tuple[int, ...]]:
    if model_dir is None:
        assert config.vocab_size is not None
        return config.vocab_size, config.max_model_len or _MOCK_DEFAULT_MAX_MODEL_LEN, ()
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    vocab_size = config.vocab_size or cfg.get("vocab_size") or len(tokenizer)
    max_len = config.max_model_len or cfg.get("max_position_embeddings")
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    eos_ids = tuple(dict.fromkeys(eos_ids + generation_eos_ids(model_dir)))
    return int(vocab_size), int(max_len or _MOCK_DEFAULT_MAX_MODEL_LEN), eos_ids
