"""Build a worker's KV tiers from its settings and put them behind its engine."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from serving.engine.core import EngineCore
from serving.kvcache.config import KVTierConfig
from serving.kvcache.disk import DiskTier
from serving.kvcache.header import ModelIdentity, model_digest
from serving.kvcache.host import HostTier, default_hash_processes
from serving.kvcache.manager import KVTierManager
from serving.kvcache.policy import (
    CUDA_HOST_BANDWIDTH_BYTES_PER_S,
    CUDA_PREFILL_TOKENS_PER_S,
    DEFAULT_PREFILL_TOKENS_PER_S,
    CostModel,
)
from serving.kvcache.s3 import S3Tier
from serving.kvcache.stack import TierIndex, TierStack
from serving.kvcache.tier import KVTier

logger = logging.getLogger(__name__)
_GIB = 1 << 30
# The mock engine has no KV bytes: its tiers move a small stand-in block per block.
_MOCK_BLOCK_BYTES = 64


def model_identity(core: EngineCore, model_dir: Path | None) -> ModelIdentity:
    """What a block must match to be loaded by this engine (see ``header.ModelIdentity``)."""
    executor: Any = core.executor
    arch = getattr(executor, "arch", None)
    if arch is None:  # the mock engine
        return ModelIdentity(model_digest(model_dir), 0, 0, 0, "mock", core.limits.block_size)
    dtype = str(executor.dtype).removeprefix("torch.")
    return ModelIdentity(
        model_digest(model_dir),
        arch.num_layers,
        arch.num_kv_heads,
        arch.head_dim,
        dtype,
        core.limits.block_size,
    )


def build_tiers(
    config: KVTierConfig, core: EngineCore, model_dir: Path | None
) -> KVTierManager | None:
    """Stores, the tier stack (attached to ``core``) and the manager; None when all are off.

    Capacities count blocks of the model's real KV size (the mock's modelled one).
    """
    if not config.enabled:
        return None
    executor: Any = core.executor
    pool = getattr(executor, "kv_pool", None)
    modelled_block_bytes = executor.kv_bytes_per_token * core.limits.block_size
    if pool is not None:
        block_view, block_bytes = pool.block_bytes_view, pool.block_bytes
        on_cuda = pool.tensor.device.type == "cuda"
    else:
        stand_in = torch.zeros((core.limits.num_blocks, _MOCK_BLOCK_BYTES), dtype=torch.uint8)
        block_view, block_bytes, on_cuda = stand_in.__getitem__, _MOCK_BLOCK_BYTES, False
    stores: list[KVTier] = []
    if config.host_gib > 0:
        stores.append(
            HostTier(
                _blocks(config.host_gib, modelled_block_bytes),
                block_bytes,
                pin_memory=on_cuda,
                hash_processes=default_hash_processes(on_cuda),
            )
        )
    if config.disk_gib > 0:
        assert config.disk_dir is not None
        stores.append(DiskTier(config.disk_dir, _blocks(config.disk_gib, modelled_block_bytes)))
    if config.s3_uri is not None:
        s3_blocks = _blocks(config.s3_gib, modelled_block_bytes) if config.s3_gib else None
        stores.append(S3Tier(config.s3_uri, s3_blocks))
    bandwidths = {"G2": CUDA_HOST_BANDWIDTH_BYTES_PER_S} if on_cuda else None
    cost = CostModel.make(
        core.limits.block_size,
        modelled_block_bytes,
        bandwidths=bandwidths,
        prefill_tokens_per_s=CUDA_PREFILL_TOKENS_PER_S if on_cuda else DEFAULT_PREFILL_TOKENS_PER_S,
    )
    cost.check = config.cost_check
    stack = TierStack(
        [TierIndex(s.name, s.capacity_blocks, shared=s.shared) for s in stores],
        cost,
        min_uses=config.min_uses,
    )
    core.attach_tiers(stack)
    identity = model_identity(core, model_dir)
    logger.info(
        "KV tiers: %s (blocks of %d bytes), model identity %s",
        ", ".join(f"{s.name} {s.medium} {s.capacity_blocks or 'unbounded'}" for s in stores),
        block_bytes,
        identity.manifest_digest,
    )
    return KVTierManager(
        stores,
        block_view=block_view,
        identity=identity,
        list_interval_s=config.s3_list_interval_s,
    )


def _blocks(gib: float, block_bytes: int) -> int:
    num_blocks = int(gib * _GIB // block_bytes)
    if num_blocks < 1:
        raise ValueError(f"{gib} GiB holds no KV block of {block_bytes} bytes")
    return num_blocks
