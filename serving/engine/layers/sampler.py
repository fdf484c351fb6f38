"""Token sampling from float32 logits: greedy, temperature, top-k, top-p, logprobs.

Owns the sampling math; holds no per-request state (the model runner keeps the seeded
``torch.Generator`` of each request and passes it in).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from serving.engine.layers.attention import host_to_device
from serving.engine.request import SamplingParams
from serving.engine.scheduler_output import TokenLogprobs


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest entries of the last dim (ties at the k-th value kept); -inf else."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: drop the least likely tokens whose total probability is ``<= 1 - p``.

    The most likely token is always kept.
    """
    if p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum_probs <= 1 - p
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Sample one token per row of ``logits [n, vocab]`` (float32).

    Greedy rows (``params[i].is_greedy``) share one argmax. Other rows are sampled one by one
    with ``generators[i]``, so a seeded request draws the same tokens whatever else is in the
    batch. Logprobs are ``log_softmax`` of the raw logits (before temperature and filters).
    """
    num_rows = logits.shape[0]
    greedy_rows = [i for i, p in enumerate(params) if p.is_greedy]
    if len(greedy_rows) == num_rows:
        token_ids = logits.argmax(dim=-1)
    else:
        token_ids = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
        if greedy_rows:
            rows = host_to_device(greedy_rows, torch.int64, logits.device)
            token_ids[rows] = logits[rows].argmax(dim=-1)
        for i, p in enumerate(params):
            if not p.is_greedy:
                token_ids[i] = _sample_row(logits[i], p, generators[i])
    token_list: list[int] = token_ids.tolist()
    return token_list, _logprobs(logits, params, token_ids)


def _sample_row(
    logits: torch.Tensor, p: SamplingParams, generator: torch.Generator
) -> torch.Tensor:
    logits = logits / p.temperature
    if p.top_k is not None:
        logits = apply_top_k(logits, p.top_k)
    logits = apply_top_p(logits, p.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]


def _logprobs(
    logits: torch.Tensor, params: Sequence[SamplingParams], token_ids: torch.Tensor
) -> list[TokenLogprobs | None]:
    out: list[TokenLogprobs | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return out
    index = host_to_device(rows, torch.int64, logits.device)
    logprobs = torch.log_softmax(logits[index].float(), dim=-1)
    sampled = token_ids[index]
    sampled_lp = logprobs.gather(1, sampled[:, None])[:, 0].tolist()
    sampled_ids = sampled.tolist()
    max_k = max(params[i].logprobs or 0 for i in rows)
    top_lp, top_ids = logprobs.topk(max_k, dim=-1)
    top_lp_list, top_ids_list = top_lp.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        k = params[i].logprobs or 0
        out[i] = TokenLogprobs(
            token_id=sampled_ids[j],
            logprob=sampled_lp[j],
            top_token_ids=top_ids_list[j][:k],
            top_logprobs=top_lp_list[j][:k],
        )
    return out
