"""Sampler: greedy, seeded sampling, top-k, top-p and logprobs on fixed logits."""

from __future__ import annotations

import math

import pytest
import torch

from serving.engine.layers.sampler import apply_top_k, apply_top_p, sample
from serving.engine.request import SamplingParams

VOCAB = 50


def _logits(seed: int, rows: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=gen) * 2.0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _draws(
    logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: int
) -> list[list[int]]:
    """Sample ``steps`` times with one persistent generator per row; tokens per row."""
    generators = [_gen(s) for s in seeds]
    rows: list[list[int]] = [[] for _ in params]
    for _ in range(steps):
        token_ids, _ = sample(logits, params, generators)
        for row, token in zip(rows, token_ids, strict=True):
            row.append(token)
    return rows


def test_greedy_rows_take_argmax() -> None:
    logits = _logits(0, 4)
    params = [SamplingParams(temperature=0.0)] * 4
    token_ids, logprobs = sample(logits, params, [_gen(0)] * 4)
    assert token_ids == logits.argmax(-1).tolist()
    assert logprobs == [None] * 4


def test_seeded_sampling_reproducible_and_independent_of_batch() -> None:
    logits = _logits(1, 3)
    hot = SamplingParams(temperature=1.5, seed=7)
    alone = _draws(logits[1:2], [hot], [7], 30)[0]
    mixed = [SamplingParams(temperature=0.0), hot, SamplingParams(temperature=0.9, top_k=5)]
    batched = _draws(logits, mixed, [123, 7, 456], 30)
    assert batched[1] == alone
    assert _draws(logits[1:2], [hot], [7], 30)[0] == alone
    assert _draws(logits[1:2], [hot], [8], 30)[0] != alone
    assert len(set(alone)) > 5
    assert batched[0] == [int(logits[0].argmax())] * 30


def test_top_k_one_equals_greedy() -> None:
    logits = _logits(2, 6)
    params = [SamplingParams(temperature=1.3, top_k=1, seed=i) for i in range(6)]
    token_ids, _ = sample(logits, params, [_gen(i) for i in range(6)])
    assert token_ids == logits.argmax(-1).tolist()
    filtered = apply_top_k(logits, 1)
    assert torch.equal(torch.isfinite(filtered).sum(-1), torch.ones(6, dtype=torch.int64))


def test_top_k_samples_only_k_most_likely() -> None:
    logits = _logits(3, 1)
    params = [SamplingParams(temperature=5.0, top_k=3)]
    drawn = set(_draws(logits, params, [0], 400)[0])
    assert drawn == set(logits[0].topk(3).indices.tolist())


def test_top_p_excludes_the_tail() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    filtered = apply_top_p(logits, 0.75)
    assert torch.isinf(filtered[0, [0, 2]]).all()
    assert torch.equal(filtered[0, [1, 3]], logits[0, [1, 3]])
    drawn = _draws(logits, [SamplingParams(temperature=1.0, top_p=0.75)], [0], 500)[0]
    assert set(drawn) == {1, 3}


def test_top_p_keeps_the_most_likely_token() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    filtered = apply_top_p(logits, 0.01)
    assert torch.isfinite(filtered).tolist() == [[False, True, False]]


def test_low_temperature_sampling_picks_the_argmax() -> None:
    logits = _logits(4, 5)
    params = [SamplingParams(temperature=1e-4, seed=i) for i in range(5)]
    token_ids, _ = sample(logits, params, [_gen(i) for i in range(5)])
    assert token_ids == logits.argmax(-1).tolist()


def test_logprobs_of_greedy_token_equal_log_softmax_max() -> None:
    logits = _logits(5, 2)
    params = [SamplingParams(temperature=0.0, logprobs=4), SamplingParams(temperature=0.0)]
    token_ids, logprobs = sample(logits, params, [_gen(0)] * 2)
    lp = logprobs[0]
    assert lp is not None and logprobs[1] is None
    expected = torch.log_softmax(logits[0], -1)
    assert lp.token_id == token_ids[0]
    assert lp.logprob == expected.max().item()
    assert lp.top_token_ids == expected.topk(4).indices.tolist()
    assert lp.top_logprobs == expected.topk(4).values.tolist()
    assert math.isclose(sum(math.exp(v) for v in expected.tolist()), 1.0, rel_tol=1e-5)


def test_logprobs_use_raw_logits_not_temperature() -> None:
    logits = _logits(6, 1)
    params = [SamplingParams(temperature=0.5, seed=3, logprobs=0)]
    token_ids, logprobs = sample(logits, params, [_gen(3)])
    lp = logprobs[0]
    assert lp is not None
    assert lp.top_token_ids == [] and lp.top_logprobs == []
    assert lp.logprob == torch.log_softmax(logits[0], -1)[token_ids[0]].item()


@pytest.mark.parametrize("k", [1, VOCAB])
def test_top_k_keeps_exactly_k(k: int) -> None:
    logits = _logits(7, 2)
    finite = torch.isfinite(apply_top_k(logits, k)).sum(-1).tolist()
    assert finite == [k, k]
