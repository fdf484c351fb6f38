"""Disaggregated prefill/decode inside the scheduler: leases, pull plans, fallbacks.

Two schedulers with the fake runner of ``test_scheduler`` (each scheduled token id is written
into its KV slot; sampling reads the whole context back through the block table, so a block
pulled into the wrong place, or read before it landed, changes the output). A "pull" copies
the prefill runner's slots of the planned remote blocks into the decode runner's planned local
blocks, as a KV transport copies bytes.
"""

from __future__ import annotations

import pytest

from serving.engine.kv_transfer import KVPull, RemotePrefill
from serving.engine.request import RequestStatus, SamplingParams
from serving.engine.scheduler import Scheduler
from tests.engine.test_scheduler import (
    Clock,
    FakeRunner,
    make_request,
    make_scheduler,
    mix,
    reference,
    run_all,
    step,
)

BLOCK = 4
PREFILL_REQUEST = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def prefill(sched: Scheduler, runner: FakeRunner, req_id: str, prompt: list[int]) -> dict:
    """Run a max_tokens=1 prefill request; return its response kv_transfer_params."""
    request = make_request(req_id, prompt, max_tokens=1)
    request.kv_transfer_params = dict(PREFILL_REQUEST)
    sched.add_request(request)
    outputs = run_all(sched, runner)[req_id]
    assert outputs[-1].finish_reason == "length"
    params = outputs[-1].kv_transfer_params
    assert params is not None and params["do_remote_prefill"] is True
    # The worker adds where the blocks are; the engine says which.
    return {**params, "remote_engine_id": "prefill-0", "remote_host": "h", "remote_port": 1}


def add_decode(sched: Scheduler, req_id: str, prompt: list[int], params: dict, **kw: object):
    request = make_request(req_id, prompt, **kw)
    request.kv_transfer_params = params
    request.remote_prefill = RemotePrefill.from_params(params)  # as EngineCore.add_request
    sched.add_request(request)
    return request


def copy_blocks(pull: KVPull, src: FakeRunner, dst: FakeRunner) -> None:
    for remote, local in zip(pull.remote_block_ids, pull.local_block_ids, strict=True):
        for offset in range(BLOCK):
            if (remote, offset) in src.slots:
                dst.slots[(local, offset)] = src.slots[(remote, offset)]


def plan_pull(sched: Scheduler, runner: FakeRunner) -> KVPull:
    out, outputs = step(sched, runner)
    assert not outputs and not out.seqs, "a remote-prefill request must not compute its prompt"
    assert len(out.kv_pulls) == 1
    return out.kv_pulls[0]


@pytest.mark.parametrize("prompt_len", [1, 3, 4, 5, 8, 9, 17, 40])
def test_remote_prefill_output_equals_a_single_engine(prompt_len: int) -> None:
    prompt = [(7 * i + 3) % 1000 for i in range(prompt_len)]
    expected, _ = reference(prompt, SamplingParams(max_tokens=6), mix)
    p_sched, p_run = make_scheduler(block_size=BLOCK), FakeRunner(BLOCK, mix)
    d_sched, d_run = make_scheduler(block_size=BLOCK), FakeRunner(BLOCK, mix)
    params = prefill(p_sched, p_run, "p1", prompt)
    assert params["remote_num_tokens"] == prompt_len
    assert len(params["remote_block_ids"]) == 1  # one KV-cache group
    assert len(params["remote_block_ids"][0]) == -(-prompt_len // BLOCK)

    add_decode(d_sched, "d1", prompt, params, max_tokens=6)
    pull = plan_pull(d_sched, d_run)
    assert pull.first_token == 0
    assert pull.num_tokens == prompt_len - 1
    assert len(pull.remote_block_ids) == -(-(prompt_len - 1) // BLOCK)
    copy_blocks(pull, p_run, d_run)
    assert d_sched.finish_kv_pull("d1", succeeded=True)
    outputs = run_all(d_sched, d_run)["d1"]
    assert [t for o in outputs for t in o.new_token_ids] == expected


def test_decode_computes_only_the_last_prompt_token() -> None:
    prompt = list(range(1, 18))  # 17 tokens, 5 blocks of 4
    p_sched, p_run = make_scheduler(block_size=BLOCK), FakeRunner(BLOCK, mix)
    d_sched, d_run = make_scheduler(block_size=BLOCK), FakeRunner(BLOCK, mix)
    params = prefill(p_sched, p_run, "p1", prompt)
    add_decode(d_sched, "d1", prompt, params, max_tokens=3)
    pull = plan_pull(d_sched, d_run)
    copy_blocks(pull, p_run, d_run)
    d_sched.finish_kv_pull("d1", succeeded=True)
    out, _ = step(d_sched, d_run)
    assert [(s.start_pos, s.num_tokens, s.sample) for s in out.seqs] == [(16, 1, True)]


def test_lease_holds_blocks_until_released() -> None:
    clock = Clock()
    p_sched, p_run = make_scheduler(num_blocks=16, block_size=BLOCK, clock=clock), FakeRunner(BLOCK)
    params = prefill(p_sched, p_run, "p1", list(range(10)))
    held = params["remote_block_ids"][0]
    assert p_sched.kv.block_pool.num_free_blocks == 16 - len(held)
    assert [lease.request_id for lease in (h.lease for h in p_sched.leases.values())] == ["p1"]
    assert p_sched.release_lease("p1")
    assert p_sched.kv.block_pool.num_free_blocks == 16
    assert not p_sched.release_lease("p1")  # once only
    assert p_sched.expire_leases() == []


def test_lease_expires_and_renews_on_the_clock() -> None:
    clock = Clock()
    p_sched, p_run = make_scheduler(num_blocks=16, block_size=BLOCK, clock=clock), FakeRunner(BLOCK)
    prefill(p_sched, p_run, "p1", list(range(10)))
    lease_s = p_sched.config.kv_lease_s
    clock.now += lease_s - 1
    assert p_sched.expire_leases() == []
    renewed = p_sched.renew_lease("p1")
    assert renewed is not None and renewed.expires_at_s == clock.now + lease_s
    clock.now += lease_s - 1
    assert p_sched.expire_leases() == []  # would have expired without the renewal
    clock.now += 1
    assert p_sched.expire_leases() == ["p1"]
    assert p_sched.kv.block_pool.num_free_blocks == 16
    assert p_sched.renew_lease("p1") is None


def test_a_leased_prefix_still_serves_the_prefill_workers_prefix_cache() -> None:
    p_sched, p_run = make_scheduler(block_size=BLOCK), FakeRunner(BLOCK, mix)
    prompt = list(range(1, 14))
    prefill(p_sched, p_run, "p1", prompt)
    request = make_request("p2", [*prompt, 99], max_tokens=2)
    p_sched.add_request(request)
    step(p_sched, p_run)
    assert request.num_cached_tokens == 12  # three full blocks of the leased request


def test_failed_pull_prefills_locally_with_the_same_output() -> None:
    prompt = [(5 * i + 1) % 1000 for i in range(23)]
    expected, _ = reference(prompt, SamplingParams(max_tokens=5), mix)
    p_sched, p_run = make_scheduler(block_size=BLOCK), FakeRunner(BLOCK, mix)
    d_sched, d_run = make_scheduler(block_size=BLOCK), FakeRunner(BLOCK, mix)
    params = prefill(p_sched, p_run, "p1", prompt)
    add_decode(d_sched, "d1", prompt, params, max_tokens=5)
    pull = plan_pull(d_sched, d_run)
    for local in pull.local_block_ids[:2]:  # a transfer that died halfway left junk behind
        for offset in range(BLOCK):
            d_run.slots[(local, offset)] = 777
    d_sched.finish_kv_pull("d1", succeeded=False)
    outputs = run_all(d_sched, d_run)["d1"]
    assert [t for o in outputs for t in o.new_token_ids] == expected


def test_pull_skips_blocks_the_decode_worker_has_cached() -> None:
    shared = [(3 * i + 2) % 1000 for i in range(12)]  # three full blocks
    prompt = [*shared, 500, 501, 502, 503, 504, 505, 506]
    expected, _ = reference(prompt, SamplingParams(max_tokens=4), mix)
    p_sched, p_run = make_scheduler(block_size=BLOCK), FakeRunner(BLOCK, mix)
    d_sched, d_run = make_scheduler(block_size=BLOCK), FakeRunner(BLOCK, mix)
    d_sched.add_request(make_request("warm", [*shared, 1], max_tokens=1))
    run_all(d_sched, d_run)

    params = prefill(p_sched, p_run, "p1", prompt)
    request = add_decode(d_sched, "d1", prompt, params, max_tokens=4)
    pull = plan_pull(d_sched, d_run)
    assert pull.first_token == 12
    assert pull.remote_block_ids == tuple(params["remote_block_ids"][0][3:5])
    assert request.num_cached_tokens == 12
    copy_blocks(pull, p_run, d_run)
    d_sched.finish_kv_pull("d1", succeeded=True)
    outputs = run_all(d_sched, d_run)["d1"]
    assert [t for o in outputs for t in o.new_token_ids] == expected


def test_fully_cached_prompt_plans_an_empty_pull() -> None:
    prompt = list(range(1, 10))  # 9 tokens: 8 needed, both blocks cached locally
    expected, _ = reference(prompt, SamplingParams(max_tokens=3), mix)
    p_sched, p_run = make_scheduler(block_size=BLOCK), FakeRunner(BLOCK, mix)
    d_sched, d_run = make_scheduler(block_size=BLOCK), FakeRunner(BLOCK, mix)
    d_sched.add_request(make_request("warm", prompt, max_tokens=1))
    run_all(d_sched, d_run)
    params = prefill(p_sched, p_run, "p1", prompt)
    add_decode(d_sched, "d1", prompt, params, max_tokens=3)
    pull = plan_pull(d_sched, d_run)
    assert pull.remote_block_ids == () and pull.num_tokens == 0
    d_sched.finish_kv_pull("d1", succeeded=True)
    outputs = run_all(d_sched, d_run)["d1"]
    assert [t for o in outputs for t in o.new_token_ids] == expected


def test_blocks_being_pulled_are_not_a_prefix_hit_for_others() -> None:
    prompt = list(range(100, 117))
    p_sched, p_run = make_scheduler(block_size=BLOCK), FakeRunner(BLOCK, mix)
    d_sched, d_run = make_scheduler(block_size=BLOCK), FakeRunner(BLOCK, mix)
    params = prefill(p_sched, p_run, "p1", prompt)
    add_decode(d_sched, "d1", prompt, params, max_tokens=2)
    pull = plan_pull(d_sched, d_run)
    other = make_request("other", prompt, max_tokens=2)
    d_sched.add_request(other)
    _, early = step(d_sched, d_run)  # the pull has not landed yet
    assert other.num_cached_tokens == 0
    copy_blocks(pull, p_run, d_run)
    d_sched.finish_kv_pull("d1", succeeded=True)
    expected, _ = reference(prompt, SamplingParams(max_tokens=2), mix)
    outputs = run_all(d_sched, d_run)
    assert [t for o in outputs["d1"] for t in o.new_token_ids] == expected
    assert [t for o in early + outputs["other"] for t in o.new_token_ids] == expected


def test_abort_during_a_pull_frees_the_blocks_only_when_it_ends() -> None:
    d_sched, d_run = make_scheduler(num_blocks=16, block_size=BLOCK), FakeRunner(BLOCK, mix)
    params = {
        **PREFILL_REQUEST,
        "do_remote_decode": False,
        "do_remote_prefill": True,
        "remote_engine_id": "prefill-0",
        "remote_request_id": "p1",
        "remote_block_ids": [[3, 4, 5]],
    }
    add_decode(d_sched, "d1", list(range(10)), params, max_tokens=2)
    plan_pull(d_sched, d_run)
    assert d_sched.finish_requests(["d1"], RequestStatus.FINISHED_ABORTED) == ["d1"]
    assert d_sched.kv.block_pool.num_free_blocks == 16 - 3  # a transfer may still write
    assert d_sched.finish_kv_pull("d1", succeeded=True)
    assert d_sched.kv.block_pool.num_free_blocks == 16
    assert not d_sched.has_unfinished_requests() and d_sched.num_unfinished_requests == 0


def test_remote_side_too_short_prefills_locally() -> None:
    prompt = list(range(20))
    params = {
        "do_remote_prefill": True,
        "remote_engine_id": "e",
        "remote_request_id": "r",
        "remote_block_ids": [[0, 1]],  # 8 tokens: cannot cover 19
    }
    d_sched, d_run = make_scheduler(block_size=BLOCK), FakeRunner(BLOCK, mix)
    add_decode(d_sched, "d1", prompt, params, max_tokens=2)
    pull = plan_pull(d_sched, d_run)
    assert pull.remote_block_ids == ()
    d_sched.finish_kv_pull("d1", succeeded=True)
    expected, _ = reference(prompt, SamplingParams(max_tokens=2), mix)
    outputs = run_all(d_sched, d_run)["d1"]
    assert [t for o in outputs for t in o.new_token_ids] == expected


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"do_remote_prefill": True, "remote_block_ids": 3}, "remote_block_ids"),
        ({"do_remote_prefill": True, "remote_block_ids": [["a"]]}, "remote_block_ids"),
        ({"do_remote_prefill": True, "remote_block_ids": [[1], [2]]}, "groups"),
        ({"do_remote_prefill": True, "remote_block_ids": [[1]]}, "remote_engine_id"),
        (
            {"do_remote_prefill": True, "remote_block_ids": [1], "remote_engine_id": "e"},
            "remote_request_id",
        ),
    ],
)
def test_malformed_params_name_the_field(params: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RemotePrefill.from_params(params)


def test_params_without_remote_prefill_are_plain_requests() -> None:
    assert RemotePrefill.from_params(None) is None
    assert RemotePrefill.from_params(PREFILL_REQUEST) is None
    # vLLM < 0.10 sent a flat list of block ids.
    flat = RemotePrefill.from_params(
        {
            "do_remote_prefill": True,
            "remote_block_ids": [4, 5],
            "remote_engine_id": "e",
            "remote_request_id": "r",
        }
    )
    assert flat is not None and flat.block_ids == (4, 5)


def test_a_reused_request_id_replaces_its_lease_without_leaking() -> None:
    p_sched, p_run = make_scheduler(num_blocks=16, block_size=BLOCK), FakeRunner(BLOCK)
    prefill(p_sched, p_run, "same", list(range(10)))
    prefill(p_sched, p_run, "same", list(range(50, 60)))
    assert list(p_sched.leases) == ["same"]
    assert p_sched.release_lease("same")
    assert p_sched.kv.block_pool.num_free_blocks == 16
