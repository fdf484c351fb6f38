"""Runs the scheduler's steps on a real model: one flattened forward pass per step.

KV cache: ``KVPool`` (``kv_pool.py``), one block-major tensor ``[num_blocks, num_layers, 2,
block_size, num_kv_heads, head_dim]``; layer ``i`` attends through the view ``kv_pool.layers[i]``.
On CUDA the layers run as Triton kernels and decode-only steps replay CUDA graphs
(``cuda_graph.py``); on CPU everything is the PyTorch reference path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from serving.engine.cpu_memory import keep_freed_memory, pack_on_huge_pages
from serving.engine.cuda_graph import DecodeGraphs, graph_batch_sizes
from serving.engine.kv_pool import KVPool
from serving.engine.layers.attention import (
    AttentionBackend,
    SeqSpan,
    host_to_device,
    make_attn_metadata,
)
from serving.engine.layers.ops import Ops, TorchOps, TritonOps
from serving.engine.layers.sampler import sample
from serving.engine.models.llama import LlamaForCausalLM
from serving.engine.models.loader import ModelArchConfig, iter_weights, load_arch_config
from serving.engine.scheduler_output import (
    ModelRunnerOutput,
    ScheduledSeq,
    SchedulerOutput,
    TokenLogprobs,
)
from serving.transfer.layout import BlockLayout

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


class ModelRunner:
    """Owns the weights, the paged KV cache, the decode CUDA graphs and each request's seeded
    sampler generator.

    Never decides what runs: block ids, positions and tokens come from the scheduler.
    ``kernels``: ``auto`` (Triton on CUDA, PyTorch on CPU), ``torch`` or ``triton``.
    ``enforce_eager`` (vLLM's name): no CUDA graphs; decode steps run the same padded shapes
    eagerly. On CPU it sets the process's heap to keep freed memory (``cpu_memory``).
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        gpu_memory_utilization: float = 0.9,
        max_num_batched_tokens: int = 2048,
        load_format: str = "auto",
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        kernels: str = "auto",
        enforce_eager: bool = False,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.arch: ModelArchConfig = load_arch_config(Path(model_dir))
        self.dtype = resolve_dtype(dtype, self.device, self.arch)
        self.block_size = block_size
        self.ops: Ops = resolve_kernels(kernels, self.device)
        self.attn_backend: AttentionBackend = "triton" if self.ops is TritonOps else "torch"
        self.model = load_model(
            Path(model_dir), self.arch, self.dtype, self.device, load_format=load_format
        )
        elem_bytes = torch.empty((), dtype=self.dtype).element_size()
        arch = self.arch
        self.kv_bytes_per_token = (
            2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * elem_bytes
        )
        if num_blocks is None:
            num_blocks = self._decide_num_blocks(
                kv_cache_bytes, gpu_memory_utilization, max_num_batched_tokens
            )
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.kv_pool = self._make_kv_pool(num_blocks)
        self.kv_cache = self.kv_pool.tensor  # the one tensor transports register
        self.kv_caches: list[torch.Tensor] = self.kv_pool.layers
        self._generators: dict[str, torch.Generator] = {}
        self._global_generator = torch.Generator(device=self.device)
        self._global_generator.seed()
        self.graphs: DecodeGraphs | None = None
        if self.ops is TritonOps:
            max_len = min(max_model_len or arch.max_model_len, arch.max_model_len)
            self.graphs = DecodeGraphs(
                self.model,
                self.kv_caches,
                self.ops,
                batch_sizes=graph_batch_sizes(max_num_seqs),
                max_blocks_per_seq=min(num_blocks, -(-max_len // block_size)),
                block_size=block_size,
                use_graphs=self.device.type == "cuda" and not enforce_eager,
            )
            self.graphs.capture()

    @property
    def bytes_per_block(self) -> int:
        return self.kv_bytes_per_token * self.block_size

    @property
    def kv_layout(self) -> BlockLayout:
        """Block id -> byte run in ``kv_cache`` (one contiguous run per block)."""
        return self.kv_pool.layout

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Compute every scheduled token in one forward pass; sample for seqs with ``sample``.

        K/V of each token goes to slot ``block_ids[pos // block_size] * block_size +
        pos % block_size``. A seeded request draws from its own generator, created at its first
        sample and kept (preemption included) until it appears in ``finished_req_ids``.
        """
        for req_id in scheduler_output.finished_req_ids:
            self._generators.pop(req_id, None)
        if scheduler_output.is_empty:
            return ModelRunnerOutput(sampled_token_ids={})
        # Decodes (one new token) first: the attention metadata batches them as one group.
        seqs = [s for s in scheduler_output.seqs if s.num_tokens == 1]
        num_decodes = len(seqs)
        seqs += [s for s in scheduler_output.seqs if s.num_tokens != 1]
        sample_rows: list[int] = []
        sample_seqs: list[ScheduledSeq] = []
        offset = 0
        for seq in seqs:
            offset += seq.num_tokens
            if seq.sample:
                sample_rows.append(offset - 1)
                sample_seqs.append(seq)
        graphs = self.graphs
        if graphs is not None and num_decodes == len(seqs) and graphs.padded_size(num_decodes):
            logits = graphs.run(seqs)
            if len(sample_rows) != num_decodes:
                logits = logits[host_to_device(sample_rows, torch.int64, self.device)]
        else:
            hidden = self._forward(seqs)
            if not sample_seqs:
                return ModelRunnerOutput(sampled_token_ids={})
            rows = host_to_device(sample_rows, torch.int64, self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows))
        if not sample_seqs:
            return ModelRunnerOutput(sampled_token_ids={})
        params = [s.sampling_params for s in sample_seqs]
        generators = [self._generator_for(s) for s in sample_seqs]
        token_ids, logprobs = sample(logits, params, generators)
        return ModelRunnerOutput(
            sampled_token_ids={s.req_id: t for s, t in zip(sample_seqs, token_ids, strict=True)},
            logprobs=_logprobs_by_req(sample_seqs, logprobs),
        )

    def read_kv_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Copy of whole blocks: ``[len(block_ids), layers, 2, block_size, kv_heads, head_dim]``.

        The result is contiguous and independent of the cache.
        """
        return self.kv_pool.read_blocks(block_ids)

    def write_kv_blocks(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Overwrite whole blocks with ``data`` shaped as ``read_kv_blocks`` returns."""
        self.kv_pool.write_blocks(block_ids, data)

    def _forward(self, seqs: Sequence[ScheduledSeq]) -> torch.Tensor:
        spans = [SeqSpan(s.start_pos, s.num_tokens, s.block_ids) for s in seqs]
        meta, positions = make_attn_metadata(
            spans, self.block_size, self.num_blocks, self.device, self.attn_backend
        )
        token_ids = [t for s in seqs for t in s.token_ids]
        input_ids = host_to_device(token_ids, torch.int64, self.device)
        return self.model(input_ids, positions, meta, self.kv_caches, self.ops)

    def _generator_for(self, seq: ScheduledSeq) -> torch.Generator:
        seed = seq.sampling_params.seed
        if seed is None:
            return self._global_generator
        generator = self._generators.get(seq.req_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            self._generators[seq.req_id] = generator
        return generator

    def _make_kv_pool(self, num_blocks: int) -> KVPool:
        arch = self.arch
        return KVPool(
            num_blocks=num_blocks,
            num_layers=arch.num_layers,
            block_size=self.block_size,
            num_kv_heads=arch.num_kv_heads,
            head_dim=arch.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    def _decide_num_blocks(
        self, kv_cache_bytes: int | None, gpu_memory_utilization: float, max_batched_tokens: int
    ) -> int:
        if kv_cache_bytes is None and self.device.type == "cuda":
            kv_cache_bytes = self._profile_free_bytes(gpu_memory_utilization, max_batched_tokens)
        if kv_cache_bytes is None:
            kv_cache_bytes = _DEFAULT_CPU_KV_CACHE_BYTES
        num_blocks = kv_cache_bytes // self.bytes_per_block
        if num_blocks < 1:
            raise ValueError(
                f"KV cache budget of {kv_cache_bytes} bytes holds no block of "
                f"{self.bytes_per_block} bytes"
            )
        logger.info("KV cache: %d blocks of %d tokens", num_blocks, self.block_size)
        return int(num_blocks)

    @torch.inference_mode()
    def _profile_free_bytes(self, utilization: float, max_batched_tokens: int) -> int:
        """Bytes left for the KV cache after weights and a warm-up forward's activation peak."""
        num_tokens = min(max_batched_tokens, self.arch.max_model_len)
        num_blocks = -(-num_tokens // self.block_size)
        scratch = self._make_kv_pool(num_blocks)
        torch.cuda.reset_peak_memory_stats(self.device)
        seq = SeqSpan(0, num_tokens, range(num_blocks))
        meta, positions = make_attn_metadata(
            [seq], self.block_size, num_blocks, self.device, self.attn_backend
        )
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        hidden = self.model(input_ids, positions, meta, scratch.layers, self.ops)
        self.model.compute_logits(hidden[-1:])
        torch.cuda.synchronize(self.device)
        peak_bytes = torch.cuda.max_memory_allocated(self.device) - scratch.tensor.nbytes
        del scratch, hidden
        torch.cuda.empty_cache()
        free_bytes, total_bytes = torch.cuda.mem_get_info(self.device)
        activation_bytes = max(0, peak_bytes - torch.cuda.memory_allocated(self.device))
        budget = int(total_bytes * utilization) - (total_bytes - free_bytes) - activation_bytes
        logger.info(
            "GPU memory: total %d, in use %d, activation peak %d, KV budget %d bytes",
            total_bytes,
            total_bytes - free_bytes,
            activation_bytes,
            budget,
        )
        return max(0, budget)


def resolve_kernels(kernels: str, device: torch.device) -> Ops:
    """``auto``: Triton kernels on CUDA, the PyTorch reference elsewhere."""
    if kernels not in ("auto", "torch", "triton"):
        raise ValueError(f"kernels must be auto, torch or triton, got {kernels!r}")
    if kernels == "torch" or (kernels == "auto" and device.type != "cuda"):
        return TorchOps
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the Triton kernels need a CUDA device (or TRITON_INTERPRET=1)")
    return TritonOps


def resolve_dtype(dtype: str, device: torch.device, arch: ModelArchConfig) -> torch.dtype:
    """``auto``: float32 on CPU; on CUDA bfloat16, or float16 when the checkpoint says so."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.float16 if arch.config_dtype == torch.float16 else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_model(
    model_dir: Path,
    arch: ModelArchConfig,
    dtype: torch.dtype,
    device: torch.device,
    *,
    load_format: str = "auto",
) -> LlamaForCausalLM:
    """Allocate the model uninitialized on ``device``, then copy the checkpoint's tensors in.

    ``load_format="dummy"`` (vLLM's name) fills the weights with seeded random values instead:
    only ``config.json`` is read, for benchmarks of large shapes without their weights.
    """
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be auto or dummy, got {load_format!r}")
    with torch.device("meta"):
        model = LlamaForCausalLM(arch)
    inv_freq = model.rotary_emb.inv_freq  # float32, computed on CPU: keep it exact
    model = model.to(dtype=dtype).to_empty(device=device)
    model.rotary_emb.inv_freq = inv_freq.to(device)
    if device.type == "cpu":
        pack_on_huge_pages(model)
    if load_format == "dummy":
        _fill_dummy_weights(model, device)
    else:
        model.load_weights(iter_weights(model_dir, dtype=dtype, device=device))
    return model.eval().requires_grad_(False)


def _fill_dummy_weights(model: torch.nn.Module, device: torch.device, seed: int = 0) -> None:
    """Norm weights 1, everything else uniform in [-0.02, 0.02] (seeded, on ``device``)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.uniform_(-0.02, 0.02, generator=generator)


def _logprobs_by_req(
    seqs: Sequence[ScheduledSeq], logprobs: Sequence[TokenLogprobs | None]
) -> dict[str, TokenLogprobs]:
    return {s.req_id: lp for s, lp in zip(seqs, logprobs, strict=True) if lp is not None}
