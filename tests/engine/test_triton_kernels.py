"""The Triton kernels against the PyTorch reference they replace (``layers/ops.TorchOps`` and
the torch attention backend), on fresh random inputs, with poisoned outputs.

On CUDA they run compiled; without a GPU they run in Triton's interpreter (``TRITON_INTERPRET=1``)
when the ``triton`` package is importable, and skip otherwise (the CPU wheel of torch does not
bring it).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the triton package is not installed")

from serving.engine.layers import triton_attention, triton_kernels
from serving.engine.layers.attention import (
    PagedBatch,
    SeqSpan,
    make_attn_metadata,
    paged_attention,
    write_kv,
)
from serving.engine.layers.ops import TorchOps
from serving.engine.layers.rotary import RotaryEmbedding
from serving.engine.models.loader import RopeScaling

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16]
# (num_heads, num_kv_heads, head_dim): Llama-3 grouping, SmolLM2's (3 queries per KV head,
# head_dim 64), and a head_dim that is not a power of two.
SHAPES = [(8, 2, 32), (9, 3, 64), (4, 4, 48)]


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 2e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_reference(dtype: torch.dtype, with_residual: bool) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(5, 96, generator=gen, device=DEVICE).to(dtype)
    res = torch.randn(5, 96, generator=gen, device=DEVICE).to(dtype) if with_residual else None
    weight = torch.rand(96, generator=gen, device=DEVICE).to(dtype) + 0.5
    out, new_res = triton_kernels.add_rms_norm(x, res, weight, 1e-5)
    ref_out, ref_res = TorchOps.add_rms_norm(x, res, weight, 1e-5)
    if DEVICE.type == "cuda":  # the interpreter rounds float32 -> bfloat16 differently
        assert torch.equal(new_res, ref_res)
    torch.testing.assert_close(new_res, ref_res, **_tol(dtype))
    torch.testing.assert_close(out, ref_out, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    gate_up = (3 * torch.randn(4, 2 * 80, generator=gen, device=DEVICE)).to(dtype)
    got = triton_kernels.silu_and_mul(gate_up)
    torch.testing.assert_close(got, TorchOps.silu_and_mul(gate_up), **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), SHAPES)
def test_rotary_and_cache_matches_reference(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    num_tokens, block_size, num_blocks = 6, 4, 5
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, generator=gen, device=DEVICE).to(dtype)
    rope = RotaryEmbedding(head_dim, 10_000.0, RopeScaling()).to(DEVICE)
    positions = torch.tensor([3, 17, 40, 41, 42, 43], device=DEVICE)
    cos, sin = rope(positions, dtype)
    slots = torch.tensor([0, 5, -1, 9, 14, 19], device=DEVICE)
    # Poisoned caches (NaN): every stored slot is overwritten, the rest must stay NaN.
    shape = (num_blocks, 2, 2, block_size, num_kv_heads, head_dim)  # [blocks, layers, K/V, ...]
    got_pool = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    ref_pool = got_pool.clone()
    scratch = torch.empty_like(ref_pool[:, 1])
    scratch_meta, _ = make_attn_metadata(
        [SeqSpan(0, num_tokens, range(num_blocks))], block_size, num_blocks, DEVICE
    )
    ref_q, ref_k, ref_v = TorchOps.rotary_and_cache(
        qkv, cos, sin, scratch, scratch_meta, num_heads, num_kv_heads
    )
    stored = slots >= 0  # slot -1 stores nothing
    write_kv(ref_k[stored], ref_v[stored], ref_pool[:, 1], slots[stored])
    got_q, got_k = triton_kernels.rotary_and_cache(
        qkv, cos, sin, got_pool[:, 1], slots, num_heads, num_kv_heads
    )
    torch.testing.assert_close(got_q, ref_q, **_tol(dtype))
    torch.testing.assert_close(got_k, ref_k, **_tol(dtype))
    torch.testing.assert_close(got_pool, ref_pool, equal_nan=True, **_tol(dtype))
    assert torch.isnan(got_pool[:, 0]).all(), "another layer's blocks were written"


def _random_spans(gen: torch.Generator, block_size: int, num_blocks: int) -> list[SeqSpan]:
    """Three decodes (contexts 1, 13, 37) then a chunk with context and a fresh prefill."""
    perm = torch.randperm(num_blocks, generator=gen, device="cpu").tolist()
    spans, used = [], 0
    for start, num_tokens in [(0, 1), (12, 1), (36, 1), (21, 19), (0, 9)]:
        num_used = -(-(start + num_tokens) // block_size)
        spans.append(SeqSpan(start, num_tokens, perm[used : used + num_used]))
        used += num_used
    return spans


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), SHAPES)
def test_paged_attention_matches_torch_backend(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    """Decodes, a chunk with cached context and a fresh prefill in one step, both backends."""
    if DEVICE.type != "cuda" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes bfloat16 tl.dot wrongly (checked on CUDA)")
    gen = torch.Generator(device="cpu").manual_seed(4)
    block_size, num_blocks = 4, 40
    spans = _random_spans(gen, block_size, num_blocks)
    num_tokens = sum(s.num_tokens for s in spans)
    pool = torch.randn(num_blocks, 3, 2, block_size, num_kv_heads, head_dim, generator=gen)
    layer = pool.to(DEVICE, dtype)[:, 1]  # a strided view, as the engine's layers are
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(DEVICE, dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    results = {}
    for backend in ("torch", "triton"):
        meta, _ = make_attn_metadata(spans, block_size, num_blocks, DEVICE, backend)
        # The engine stores the new tokens' k/v before attending (the fresh prefill reads
        # its own k/v, the others the cache).
        write_kv(k, v, layer, meta.slot_mapping)
        results[backend] = paged_attention(q, k, v, layer, meta, head_dim**-0.5)
    assert not torch.isnan(results["triton"]).any()
    rel = _rel_err(results["triton"], results["torch"])
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel


@pytest.mark.parametrize("num_splits", [2, 3, 7])
def test_split_keys_match_the_torch_backend(num_splits: int) -> None:
    """Keys cut into pieces (flash-decoding) and merged: decodes of 1-37 keys and a chunk with
    40 cached keys, so some pieces hold no key of a sequence and some rows see none of a piece."""
    gen = torch.Generator(device="cpu").manual_seed(5)
    block_size, num_blocks, num_heads, num_kv_heads, head_dim = 4, 40, 8, 2, 32
    spans = _random_spans(gen, block_size, num_blocks)[:4]  # no fresh prefill: all paged
    num_tokens = sum(s.num_tokens for s in spans)
    pool = torch.randn(num_blocks, 2, 2, block_size, num_kv_heads, head_dim, generator=gen)
    layer = pool.to(DEVICE)[:, 1]
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(DEVICE)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    ref_meta, _ = make_attn_metadata(spans, block_size, num_blocks, DEVICE, "torch")
    write_kv(k, v, layer, ref_meta.slot_mapping)
    ref = paged_attention(q, k, v, layer, ref_meta, head_dim**-0.5)
    meta, _ = make_attn_metadata(spans, block_size, num_blocks, DEVICE, "triton")
    assert meta.paged is not None and meta.paged.max_seq_len == 40
    out = torch.full_like(q, float("nan"))
    triton_attention.paged_attention(q, layer, out, meta.paged, head_dim**-0.5, num_splits)
    assert _rel_err(out, ref) < 1e-5


def test_keys_are_split_only_where_the_batch_leaves_the_gpu_idle() -> None:
    assert triton_attention.num_kv_splits(16, 16_384, 132) == 17  # a chunk on a long prefix
    assert triton_attention.num_kv_splits(8, 16_384, 132) == 32  # one decode: capped
    assert triton_attention.num_kv_splits(8, 1_000, 132) == 1  # too few keys to cut
    assert triton_attention.num_kv_splits(256, 16_384, 132) == 1  # the batch fills the GPU
    assert triton_attention.num_kv_splits(8, 0, 132) == 1  # length unknown (CUDA graph)


def test_paged_attention_padding_rows_are_zero() -> None:
    """A sequence of length 0 (CUDA-graph padding) attends nothing and yields zeros."""
    layer = torch.randn(4, 2, 4, 2, 32).to(DEVICE)
    q = torch.randn(2, 4, 32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    ints = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    batch = PagedBatch(ints([[1, 2], [0, 0]]), ints([5, 0]), ints([0, 1]), ints([1, 1]), 1)
    triton_attention.paged_attention(q, layer, out, batch, 32**-0.5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert not torch.isnan(out[0]).any()
