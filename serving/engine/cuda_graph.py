"""Decode steps as CUDA graphs: one graph per padded batch size, replayed with static inputs.

A decode-only step of ``B`` sequences runs at the smallest captured size ``>= B``; rows past
``B`` are padding (sequence length 0, cache slot -1: they attend nothing and store nothing).
The inputs live in static device tensors that every graph reads::

    ints [4, max_batch] int32: token ids | positions | cache slots | sequence lengths
    block_tables [max_batch, max_blocks_per_seq] int32

and are filled from one pinned host copy per step (two copies). The graph covers embedding,
every layer (Triton kernels: fused norms, rotary + KV store, paged attention) and the logits;
sampling runs after it. With ``use_graphs=False`` the same padded step runs eagerly, so the
two modes compute the same thing and their outputs can be compared exactly. Owns the graphs,
their memory pool and the static inputs; never decides which sequences run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from serving.engine.layers.attention import AttentionMetadata, PagedBatch
from serving.engine.layers.ops import Ops
from serving.engine.models.llama import LlamaForCausalLM
from serving.engine.scheduler_output import ScheduledSeq

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to ``max_num_seqs`` (vLLM's spacing)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs]
    sizes += list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] < max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    """Static decode inputs, the graphs captured over them, and the padded replay."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_layers: Sequence[torch.Tensor],
        ops: Ops,
        *,
        batch_sizes: Sequence[int],
        max_blocks_per_seq: int,
        block_size: int,
        use_graphs: bool = True,
    ) -> None:
        self.model, self.kv_layers, self.ops = model, list(kv_layers), ops
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_batch = self.batch_sizes[-1]
        self.block_size = block_size
        self.use_graphs = use_graphs
        device = kv_layers[0].device
        n, width = self.max_batch, max_blocks_per_seq
        pin = device.type == "cuda"
        self._host_ints = torch.zeros((4, n), dtype=torch.int32, pin_memory=pin)
        self._host_tables = torch.zeros((n, width), dtype=torch.int32, pin_memory=pin)
        self._ints = torch.zeros((4, n), dtype=torch.int32, device=device)
        self._ints[2].fill_(-1)
        self._tables = torch.zeros((n, width), dtype=torch.int32, device=device)
        self._query_start = torch.arange(n, dtype=torch.int32, device=device)
        self._query_lens = torch.ones(n, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self.num_padded_steps = 0  # decode steps run here (replayed or eager)

    def padded_size(self, num_seqs: int) -> int | None:
        """The captured size a batch of ``num_seqs`` decodes runs at; None if too large."""
        return next((s for s in self.batch_sizes if s >= num_seqs), None)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, in one shared memory pool."""
        if not self.use_graphs:
            return
        start_s = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.batch_sizes):
            self._forward(size)  # warm-up: Triton compiles, cuBLAS picks its kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[size] = self._forward(size)
            self._graphs[size] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured %d decode CUDA graphs (batch %s) in %.1f s",
            len(self._graphs),
            self.batch_sizes,
            time.perf_counter() - start_s,
        )

    @torch.inference_mode()
    def run(self, seqs: Sequence[ScheduledSeq]) -> torch.Tensor:
        """Logits ``[len(seqs), vocab]`` (float32) of a decode-only step, in ``seqs`` order."""
        num_seqs = len(seqs)
        size = self.padded_size(num_seqs)
        if size is None:
            raise ValueError(f"{num_seqs} decodes exceed the largest graph ({self.max_batch})")
        self._fill(seqs, size)
        self.num_padded_steps += 1
        if self.use_graphs:
            self._graphs[size].replay()
            return self._logits[size][:num_seqs]
        return self._forward(size)[:num_seqs]

    def _fill(self, seqs: Sequence[ScheduledSeq], size: int) -> None:
        ints = self._host_ints.numpy()
        tables = self._host_tables.numpy()
        width = tables.shape[1]
        block_size = self.block_size
        num_seqs = len(seqs)
        for i, seq in enumerate(seqs):
            pos = seq.start_pos
            num_used = pos // block_size + 1
            if num_used > width or len(seq.block_ids) < num_used:
                raise ValueError(f"request {seq.req_id}: position {pos} outside its block table")
            block_ids = seq.block_ids[:num_used]
            ints[0, i] = seq.token_ids[0]
            ints[1, i] = pos
            ints[2, i] = block_ids[-1] * block_size + pos % block_size
            ints[3, i] = pos + 1
            tables[i, :num_used] = block_ids
        ints[0:2, num_seqs:size] = 0
        ints[2, num_seqs:size] = -1
        ints[3, num_seqs:size] = 0
        self._ints.copy_(self._host_ints, non_blocking=True)  # [4, max_batch]: one small copy
        # Whole rows: one contiguous pinned copy (columns past a sequence's end are not read).
        self._tables[:num_seqs].copy_(self._host_tables[:num_seqs], non_blocking=True)

    def _forward(self, size: int) -> torch.Tensor:
        ints = self._ints
        meta = AttentionMetadata(
            slot_mapping=ints[2, :size],
            num_decode_tokens=size,
            prefills=[],
            backend="triton",
            paged=PagedBatch(
                block_tables=self._tables[:size],
                seq_lens=ints[3, :size],
                query_start=self._query_start[:size],
                query_lens=self._query_lens[:size],
                max_query_len=1,
            ),
        )
        hidden = self.model(ints[0, :size], ints[1, :size], meta, self.kv_layers, self.ops)
        return self.model.compute_logits(hidden)
