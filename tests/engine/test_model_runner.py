"""ModelRunner against Hugging Face transformers on tiny random checkpoints and on SmolLM2.

Each test drives ``execute_model`` with hand-built ``SchedulerOutput``s, the way the scheduler
does, and compares tokens with ``transformers`` ``generate`` (greedy, float32, SDPA).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from serving.engine.layers.attention import (
    SeqSpan,
    make_attn_metadata,
    paged_attention,
    store_kv,
    write_kv,
)
from serving.engine.model_runner import ModelRunner
from serving.engine.request import SamplingParams
from serving.engine.scheduler_output import ScheduledSeq, SchedulerOutput

ARCHS = ("llama", "qwen2", "mistral")
BLOCK_SIZE = 4
NUM_BLOCKS = 64
GREEDY = SamplingParams(temperature=0.0, max_tokens=64)

_DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


def _tiny_config(arch: str) -> LlamaConfig | Qwen2Config | MistralConfig:
    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # Large weights make random logits peaked and generations varied (no repeat loops).
        initializer_range=0.3,
        bos_token_id=None,
        eos_token_id=None,
    )
    if arch == "llama":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return LlamaConfig(**common, tie_word_embeddings=True, rope_parameters=rope)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False, use_sliding_window=False)
    # head_dim * num_heads != hidden_size exercises Mistral's explicit head_dim.
    return MistralConfig(**common, head_dim=32, sliding_window=4096)


_MODEL_CLASSES = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "mistral": MistralForCausalLM,
}


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight checkpoint of each architecture, saved with ``save_pretrained``."""
    torch.manual_seed(0)
    model = _MODEL_CLASSES[request.param](_tiny_config(request.param))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path


def _hf_model(path: Path, device: str) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.to(device).eval()


def _hf_greedy(model: PreTrainedModel, prompt: list[int], num_new: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=num_new,
            do_sample=False,
            pad_token_id=0,
        )
    tokens = out[0, len(prompt) :].tolist()
    assert len(tokens) == num_new
    return tokens


def _prompt(seed: int, length: int, vocab: int = 256) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(length)]


@dataclass
class _Req:
    """A request as a minimal scheduler sees it: prefill in chunks, then one token a step."""

    req_id: str
    prompt: list[int]
    block_ids: list[int]
    params: SamplingParams = field(default_factory=lambda: GREEDY)
    chunk_size: int = 1 << 30
    join_step: int = 0
    outputs: list[int] = field(default_factory=list)
    num_computed: int = 0

    def next_seq(self) -> ScheduledSeq:
        tokens = self.prompt + self.outputs
        if self.num_computed < len(self.prompt):
            end = min(len(self.prompt), self.num_computed + self.chunk_size)
        else:
            end = len(tokens)
        return ScheduledSeq(
            req_id=self.req_id,
            token_ids=tokens[self.num_computed : end],
            start_pos=self.num_computed,
            block_ids=self.block_ids,
            sample=end == len(tokens),
            sampling_params=self.params,
            num_output_tokens=len(self.outputs),
        )


def _drive(runner: ModelRunner, reqs: list[_Req], num_new: int) -> dict[str, list[int]]:
    """Run steps until every request has ``num_new`` outputs; return them by request id."""
    step = 0
    while any(len(r.outputs) < num_new for r in reqs):
        active = [r for r in reqs if r.join_step <= step and len(r.outputs) < num_new]
        seqs = [r.next_seq() for r in active]
        out = runner.execute_model(SchedulerOutput(seqs=seqs))
        assert set(out.sampled_token_ids) == {s.req_id for s in seqs if s.sample}
        for req, seq in zip(active, seqs, strict=True):
            req.num_computed += seq.num_tokens
            if seq.sample:
                req.outputs.append(out.sampled_token_ids[req.req_id])
        step += 1
    return {r.req_id: r.outputs for r in reqs}


def _scattered_blocks(seed: int, count: int, per_req: int) -> list[list[int]]:
    """Disjoint, non-contiguous block lists (shuffled block ids)."""
    ids = list(range(NUM_BLOCKS))
    random.Random(seed).shuffle(ids)
    return [ids[i * per_req : (i + 1) * per_req] for i in range(count)]


def _runner(path: Path, device: str = "cpu") -> ModelRunner:
    # float32 everywhere: "auto" would pick bfloat16 on CUDA.
    return ModelRunner(
        path, device=device, dtype="float32", block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS
    )


def test_attn_metadata_slots_rows_and_masks() -> None:
    spans = [SeqSpan(5, 1, [7, 2, 9]), SeqSpan(2, 5, [3, 0, 6])]
    meta, positions = make_attn_metadata(spans, 4, 10, torch.device("cpu"))
    assert positions.tolist() == [5, 2, 3, 4, 5, 6]
    # slot = block_ids[pos // 4] * 4 + pos % 4
    assert meta.slot_mapping.tolist() == [9, 14, 15, 0, 1, 2]
    assert meta.num_decode_tokens == 1
    assert meta.decode_block_ids is not None and meta.decode_block_ids.tolist() == [[7, 2]]
    assert meta.decode_mask is not None
    assert meta.decode_mask.tolist() == [[[[True] * 6 + [False] * 2]]]
    (chunk,) = meta.prefills
    assert (chunk.token_start, chunk.num_tokens, chunk.start_pos) == (1, 5, 2)
    assert chunk.block_ids is not None and chunk.block_ids.tolist() == [3, 0]
    assert chunk.mask is not None
    assert chunk.mask.tolist() == [[j <= 2 + i for j in range(7)] for i in range(5)]
    assert meta.paged is None
    with pytest.raises(ValueError, match="must precede"):
        make_attn_metadata(spans[::-1], 4, 10, torch.device("cpu"))


def _reference_attention(
    q: torch.Tensor, layer: torch.Tensor, block_ids: list[int], start: int
) -> torch.Tensor:
    """Causal attention of ``q [n, Hq, D]`` at positions ``start..`` over the blocks' K/V."""
    end = start + q.shape[0]
    keys = torch.cat([layer[b, 0] for b in block_ids])[:end].double()
    values = torch.cat([layer[b, 1] for b in block_ids])[:end].double()
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), keys) * q.shape[-1] ** -0.5
    causal = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", weights, values).float()


def test_step_rows_are_built_once_and_fit_every_layer() -> None:
    """Torch backend: the rows into the cache, computed at the first layer, store and gather
    at the right places in every layer of a block-major pool."""
    spans = [SeqSpan(5, 1, [7, 2, 9]), SeqSpan(2, 5, [3, 0, 6])]
    meta, _ = make_attn_metadata(spans, 4, 10, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(10, 3, 2, 4, 2, 8, generator=gen)  # [blocks, layers, K/V, 4, 2, 8]
    expected_pool = pool.clone()
    q = torch.randn(6, 4, 8, generator=gen)
    for layer in range(3):
        k, v = torch.randn(2, 6, 2, 8, generator=gen)
        store_kv(k, v, pool[:, layer], meta)
        rows = meta.rows
        out = paged_attention(q, k, v, pool[:, layer], meta, 8**-0.5)
        assert rows is not None and meta.rows is rows, "rebuilt within the step"
        write_kv(k, v, expected_pool[:, layer], meta.slot_mapping)
        assert torch.equal(pool, expected_pool)
        view = pool[:, layer]
        torch.testing.assert_close(out[:1], _reference_attention(q[:1], view, [7, 2], 5))
        torch.testing.assert_close(out[1:], _reference_attention(q[1:], view, [3, 0], 2))


def test_attn_metadata_for_the_paged_kernel() -> None:
    """Triton backend: decodes and chunks with cached context go to the kernel, no masks."""
    spans = [SeqSpan(5, 1, [7, 2, 9]), SeqSpan(2, 5, [3, 0, 6]), SeqSpan(0, 3, [4])]
    meta, positions = make_attn_metadata(spans, 4, 10, torch.device("cpu"), backend="triton")
    assert positions.tolist() == [5, 2, 3, 4, 5, 6, 0, 1, 2]
    assert meta.slot_mapping.tolist() == [9, 14, 15, 0, 1, 2, 16, 17, 18]
    assert meta.decode_mask is None and all(c.mask is None for c in meta.prefills)
    paged = meta.paged
    assert paged is not None
    assert paged.block_tables.tolist() == [[7, 2], [3, 0]]
    assert paged.seq_lens.tolist() == [6, 7]
    assert paged.query_start.tolist() == [0, 1]
    assert paged.query_lens.tolist() == [1, 5]
    assert paged.max_query_len == 5
    assert [c.start_pos for c in meta.prefills] == [2, 0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_building_a_step_does_not_wait_for_queued_gpu_work(backend: str) -> None:
    """The metadata of a step is built while the stream is still busy (a KV onboard's copies):
    the host goes on launching, and the indices are right once the GPU gets to them."""
    device = torch.device("cuda")
    spans = [SeqSpan(5, 1, [7, 2, 9]), SeqSpan(2, 5, [3, 0, 6]), SeqSpan(0, 3, [4])]
    busy_until = torch.cuda.Event()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time on the current stream
    busy_until.record()
    meta, positions = make_attn_metadata(spans, 4, 10, device, backend=backend)  # type: ignore[arg-type]
    assert not busy_until.query(), "building the step waited for the GPU"
    torch.cuda.synchronize()
    assert positions.tolist() == [5, 2, 3, 4, 5, 6, 0, 1, 2]
    assert meta.slot_mapping.tolist() == [9, 14, 15, 0, 1, 2, 16, 17, 18]


@pytest.mark.parametrize("device", _DEVICES)
def test_logits_match_hf_forward_through_prefill_chunk_and_decode(tiny: Path, device: str) -> None:
    """Prefill (no cache), a chunk with cached context and decodes all give HF's logits."""
    hf = _hf_model(tiny, device)
    runner = _runner(tiny, device)
    tokens = _prompt(1, 21)
    with torch.no_grad():
        expected = hf(torch.tensor([tokens], device=device)).logits[0].float()
    blocks = _scattered_blocks(1, 1, 8)[0]
    pieces = [(0, 9), (9, 16), (16, 17), (17, 18), (18, 21)]
    got = []
    with torch.inference_mode():
        for start, end in pieces:
            span = SeqSpan(start, end - start, blocks)
            meta, positions = make_attn_metadata([span], BLOCK_SIZE, NUM_BLOCKS, runner.device)
            ids = torch.tensor(tokens[start:end], device=device)
            hidden = runner.model(ids, positions, meta, runner.kv_caches)
            got.append(runner.model.compute_logits(hidden))
    logits = torch.cat(got)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", _DEVICES)
def test_greedy_matches_hf_generate(tiny: Path, device: str) -> None:
    hf = _hf_model(tiny, device)
    prompt = _prompt(2, 11)
    blocks = _scattered_blocks(2, 1, 10)[0]
    got = _drive(_runner(tiny, device), [_Req("a", prompt, blocks)], 20)
    assert got["a"] == _hf_greedy(hf, prompt, 20)


def test_chunked_prefill_matches_single_prefill(tiny: Path) -> None:
    prompt = _prompt(3, 23)
    blocks = _scattered_blocks(3, 2, 10)
    single = _drive(_runner(tiny), [_Req("a", prompt, blocks[0])], 12)["a"]
    chunked = _drive(_runner(tiny), [_Req("a", prompt, blocks[1], chunk_size=5)], 12)["a"]
    assert chunked == single
    assert single == _hf_greedy(_hf_model(tiny, "cpu"), prompt, 12)


def test_batch_of_different_lengths_matches_each_alone(tiny: Path) -> None:
    """Decodes and (chunked) prefills of other requests share steps without changing tokens."""
    hf = _hf_model(tiny, "cpu")
    prompts = [_prompt(10 + i, n) for i, n in enumerate((5, 13, 22, 1))]
    blocks = _scattered_blocks(4, len(prompts), 10)
    reqs = [
        _Req("r0", prompts[0], blocks[0]),
        _Req("r1", prompts[1], blocks[1], join_step=2),
        _Req("r2", prompts[2], blocks[2], chunk_size=6, join_step=1),
        _Req("r3", prompts[3], blocks[3], join_step=3),
    ]
    got = _drive(_runner(tiny), reqs, 14)
    for req, prompt in zip(reqs, prompts, strict=True):
        assert got[req.req_id] == _hf_greedy(hf, prompt, 14), req.req_id


def test_kv_blocks_round_trip_and_resume_elsewhere(tiny: Path) -> None:
    """KV read from one set of blocks and written to another continues the same generation."""
    runner = _runner(tiny)
    prompt = _prompt(5, 14)
    src, dst = _scattered_blocks(5, 2, 8)
    req = _Req("a", prompt, src)
    _drive(runner, [req], 1)
    num_used = -(-req.num_computed // BLOCK_SIZE)
    data = runner.read_kv_blocks(src[:num_used])
    assert data.shape == (num_used, 2, 2, BLOCK_SIZE, 2, runner.arch.head_dim)
    assert data.is_contiguous()
    runner.write_kv_blocks(dst[:num_used], data)
    assert torch.equal(runner.read_kv_blocks(dst[:num_used]), data)
    runner.write_kv_blocks(src[:num_used], torch.zeros_like(data))
    assert not torch.equal(runner.read_kv_blocks(dst[:num_used]), torch.zeros_like(data))
    req.block_ids = dst
    got = _drive(runner, [req], 10)["a"]
    assert got == _hf_greedy(_hf_model(tiny, "cpu"), prompt, 10)


def test_write_kv_blocks_rejects_wrong_shape(tiny: Path) -> None:
    runner = _runner(tiny)
    data = runner.read_kv_blocks([1, 2])
    with pytest.raises(ValueError, match="shape"):
        runner.write_kv_blocks([1, 2, 3], data)


def test_steps_without_sampling_and_empty_steps_return_no_tokens(tiny: Path) -> None:
    runner = _runner(tiny)
    assert runner.execute_model(SchedulerOutput(seqs=[])).sampled_token_ids == {}
    seq = ScheduledSeq("a", _prompt(6, 7), 0, [3, 9], sample=False, sampling_params=GREEDY)
    assert runner.execute_model(SchedulerOutput(seqs=[seq])).sampled_token_ids == {}


def test_bad_block_tables_raise(tiny: Path) -> None:
    runner = _runner(tiny)
    seq = ScheduledSeq("a", _prompt(6, 9), 0, [3, 9], sample=True, sampling_params=GREEDY)
    with pytest.raises(ValueError, match="cannot hold positions up to 9"):
        runner.execute_model(SchedulerOutput(seqs=[seq]))
    seq.block_ids = [3, 9, NUM_BLOCKS]
    with pytest.raises(ValueError, match=rf"outside \[0, {NUM_BLOCKS}\)"):
        runner.execute_model(SchedulerOutput(seqs=[seq]))


def _sampled(runner: ModelRunner, reqs: list[_Req], num_new: int) -> dict[str, list[int]]:
    for req in reqs:
        req.outputs, req.num_computed = [], 0
    return _drive(runner, reqs, num_new)


def test_seeded_sampling_independent_of_batch(tiny: Path) -> None:
    seeded = SamplingParams(temperature=1.0, seed=1234)
    prompt = _prompt(7, 9)
    blocks = _scattered_blocks(7, 3, 8)
    alone = _drive(_runner(tiny), [_Req("s1", prompt, blocks[0], seeded)], 10)["s1"]
    batch = [
        _Req("g", _prompt(8, 12), blocks[1]),
        _Req("s2", prompt, blocks[0], seeded, join_step=1),
        _Req("u", _prompt(9, 4), blocks[2], SamplingParams(temperature=1.0)),
    ]
    assert _drive(_runner(tiny), batch, 10)["s2"] == alone
    assert len(set(alone)) > 1


def test_seeded_generator_kept_until_finished(tiny: Path) -> None:
    runner = _runner(tiny)
    params = SamplingParams(temperature=1.0, seed=99)
    req = _Req("s", _prompt(10, 6), _scattered_blocks(10, 1, 8)[0], params)
    first = _sampled(runner, [req], 8)["s"]
    # Same request id again without finishing: its generator continues its stream.
    assert _sampled(runner, [req], 8)["s"] != first
    runner.execute_model(SchedulerOutput(seqs=[], finished_req_ids={"s"}))
    assert _sampled(runner, [req], 8)["s"] == first


def test_seeded_generator_survives_preemption(tiny: Path) -> None:
    params = SamplingParams(temperature=1.0, seed=5)
    prompt = _prompt(11, 7)
    blocks = _scattered_blocks(11, 1, 8)[0]
    expected = _drive(_runner(tiny), [_Req("s", prompt, blocks, params)], 9)["s"]
    runner = _runner(tiny)
    req = _Req("s", prompt, blocks, params)
    _drive(runner, [req], 4)
    # Preempted: KV dropped, the request is recomputed from prompt + outputs into new blocks.
    runner.execute_model(SchedulerOutput(seqs=[], preempted_req_ids={"s"}))
    resumed = _Req("s", prompt + req.outputs, blocks[::-1], params)
    rest = _drive(runner, [resumed], 5)["s"]
    assert req.outputs + rest == expected


def test_logprobs_returned_for_requests_asking(tiny: Path) -> None:
    runner = _runner(tiny)
    seqs = [
        ScheduledSeq(
            "lp", _prompt(12, 5), 0, [1, 2], True, SamplingParams(temperature=0.0, logprobs=3)
        ),
        ScheduledSeq("no", _prompt(13, 5), 0, [3, 4], True, GREEDY),
    ]
    out = runner.execute_model(SchedulerOutput(seqs=seqs))
    assert set(out.logprobs) == {"lp"}
    lp = out.logprobs["lp"]
    assert lp.token_id == out.sampled_token_ids["lp"] == lp.top_token_ids[0]
    assert len(lp.top_logprobs) == 3 and lp.logprob == lp.top_logprobs[0]


def test_runner_sizes_cache_and_resolves_dtype(tiny: Path) -> None:
    runner = ModelRunner(tiny, block_size=8, kv_cache_bytes=1 << 20)
    arch = runner.arch
    assert runner.dtype == torch.float32 and runner.device == torch.device("cpu")
    assert runner.kv_bytes_per_token == 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * 4
    assert runner.num_blocks == (1 << 20) // (runner.kv_bytes_per_token * 8)
    assert runner.kv_cache.shape == (
        runner.num_blocks,
        arch.num_layers,
        2,
        8,
        arch.num_kv_heads,
        arch.head_dim,
    )
    assert ModelRunner(tiny, dtype="bfloat16", num_blocks=3).kv_cache.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be"):
        ModelRunner(tiny, dtype="int8", num_blocks=3)
    with pytest.raises(ValueError, match="holds no block"):
        ModelRunner(tiny, kv_cache_bytes=10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_dtype_and_profiled_cache_size(tiny: Path) -> None:
    torch.cuda.empty_cache()
    free_before, total = torch.cuda.mem_get_info()
    runner = ModelRunner(tiny, device="cuda", gpu_memory_utilization=0.3)
    assert runner.dtype == torch.bfloat16 and runner.kv_cache.dtype == torch.bfloat16
    cache_bytes = runner.num_blocks * runner.bytes_per_block
    assert 0 < cache_bytes <= 0.3 * total - (total - free_before)
    assert cache_bytes > 0.3 * total - (total - free_before) - (256 << 20)
    got = _drive(runner, [_Req("a", _prompt(1, 9), [5, 1, 7, 3])], 4)["a"]
    assert all(0 <= t < runner.arch.vocab_size for t in got)


@pytest.mark.slow
def test_smollm2_greedy_matches_hf_generate(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    hf = _hf_model(smollm2_dir, "cpu")
    texts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village by the sea,",
    ]
    prompts = [tokenizer(t).input_ids for t in texts]
    runner = ModelRunner(smollm2_dir, block_size=16, num_blocks=NUM_BLOCKS)
    blocks = _scattered_blocks(0, len(prompts), 4)
    reqs = [_Req(f"r{i}", p, b) for i, (p, b) in enumerate(zip(prompts, blocks, strict=True))]
    got = _drive(runner, reqs, 24)
    for req, prompt in zip(reqs, prompts, strict=True):
        assert got[req.req_id] == _hf_greedy(hf, prompt, 24), req.req_id
