"""Scheduler on CPU with a fake runner over a simulated paged KV cache.

The fake runner writes each scheduled token id into its KV slot, then reads every sampled
sequence's whole context back through its block table and returns ``next_token(context)``. A
block handed out while it still held someone else's tokens, or a wrong prefix hit, changes the
context it reads and so the tokens it returns.
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Callable

import pytest

from serving.engine.kv_cache_manager import KVCacheManager, cdiv
from serving.engine.outputs import EngineCoreOutput
from serving.engine.request import Request, RequestStatus, SamplingParams
from serving.engine.scheduler import Scheduler, SchedulerConfig
from serving.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from serving.protocol.kv_events import BlockRemoved, BlockStored
from serving.router.block_set import BlockSetTracker

VOCAB = 1000
NextToken = Callable[[list[int]], int]


def plus_one(context: list[int]) -> int:
    return (context[-1] + 1) % VOCAB


def mix(context: list[int]) -> int:
    """Depends on every token and its position: a stale or misplaced slot changes it."""
    h = 0
    for t in context:
        h = (h * 31 + t + 1) % 1_000_003
    return h % VOCAB


class FakeRunner:
    """Writes scheduled tokens into slots, then samples ``next_token`` of each read-back context."""

    def __init__(self, block_size: int, next_token: NextToken = plus_one) -> None:
        self.block_size = block_size
        self.next_token = next_token
        self.slots: dict[tuple[int, int], int] = {}

    def _slot(self, block_ids: list[int], pos: int) -> tuple[int, int]:
        return block_ids[pos // self.block_size], pos % self.block_size

    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for seq in out.seqs:  # every token's KV is written before any attention reads
            assert len(seq.block_ids) == cdiv(seq.seq_len, self.block_size)
            for i, token_id in enumerate(seq.token_ids):
                self.slots[self._slot(seq.block_ids, seq.start_pos + i)] = token_id
        sampled = {}
        for seq in out.seqs:
            if seq.sample:
                context = [self.slots[self._slot(seq.block_ids, p)] for p in range(seq.seq_len)]
                sampled[seq.req_id] = self.next_token(context)
        return ModelRunnerOutput(sampled_token_ids=sampled)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 256,
    max_model_len: int = 256,
    clock: Callable[[], float] | None = None,
    enable_caching: bool = True,
) -> Scheduler:
    config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len)
    kv = KVCacheManager(num_blocks, block_size, enable_caching=enable_caching)
    return Scheduler(config, kv, clock=clock or Clock())


def make_request(
    req_id: str, prompt: list[int], eos_token_id: int | None = None, **params: object
) -> Request:
    return Request(req_id, list(prompt), SamplingParams(**params), eos_token_id=eos_token_id)


def step(sched: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    out = sched.schedule()
    return out, sched.update_from_output(out, runner.execute_model(out))


def plan(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    """(request id, start position, number of tokens, sample) per scheduled sequence."""
    return [(s.req_id, s.start_pos, s.num_tokens, s.sample) for s in out.seqs]


def tokens_of(outputs: list[EngineCoreOutput]) -> dict[str, list[int]]:
    return {o.request_id: o.new_token_ids for o in outputs}


def run_all(sched: Scheduler, runner: FakeRunner, max_steps: int = 5000) -> dict[str, list]:
    """Step until idle; every request's outputs in order."""
    by_req: dict[str, list[EngineCoreOutput]] = defaultdict(list)
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return by_req
        _, outputs = step(sched, runner)
        for o in outputs:
            by_req[o.request_id].append(o)
    raise AssertionError(f"not done after {max_steps} steps")


def reference(
    prompt: list[int],
    params: SamplingParams,
    next_token: NextToken,
    eos_token_id: int | None = None,
    max_model_len: int = 10**9,
) -> tuple[list[int], str]:
    """Output tokens and finish reason of one request, computed without any engine."""
    context, out = list(prompt), []
    while True:
        token = next_token(context)
        context.append(token)
        out.append(token)
        if not params.ignore_eos and token == eos_token_id:
            return out, "stop"
        if token in params.stop_token_ids:
            return out, "stop"
        if len(out) >= params.max_tokens or len(context) >= max_model_len:
            return out, "length"


# -- batching and chunking ---------------------------------------------------------------------


def test_continuous_batching_requests_join_and_leave_each_step() -> None:
    sched, runner = make_scheduler(), FakeRunner(4)
    sched.add_request(make_request("a", [10, 11, 12], max_tokens=3))
    out, outputs = step(sched, runner)
    assert plan(out) == [("a", 0, 3, True)]
    assert tokens_of(outputs) == {"a": [13]}

    sched.add_request(make_request("b", [20, 21], max_tokens=2))
    out, outputs = step(sched, runner)
    assert plan(out) == [("a", 3, 1, True), ("b", 0, 2, True)]
    assert out.seqs[0].token_ids == [13]
    assert tokens_of(outputs) == {"a": [14], "b": [22]}

    sched.add_request(make_request("c", [30], max_tokens=1))
    out, outputs = step(sched, runner)
    assert plan(out) == [("a", 4, 1, True), ("b", 2, 1, True), ("c", 0, 1, True)]
    assert tokens_of(outputs) == {"a": [15], "b": [23], "c": [31]}
    assert [o.finish_reason for o in outputs] == ["length", "length", "length"]
    assert not sched.has_unfinished_requests()

    sched.add_request(make_request("d", [40], max_tokens=1))
    out, outputs = step(sched, runner)
    assert plan(out) == [("d", 0, 1, True)]
    assert out.finished_req_ids == {"a", "b", "c"}
    assert tokens_of(outputs) == {"d": [41]}
    assert sched.schedule().finished_req_ids == {"d"}


def test_chunked_prefill_splits_prompts_under_the_token_budget() -> None:
    sched, runner = make_scheduler(max_num_batched_tokens=8), FakeRunner(4)
    sched.add_request(make_request("a", list(range(100, 120)), max_tokens=3))
    sched.add_request(make_request("b", list(range(200, 210)), max_tokens=2))

    steps = [step(sched, runner) for _ in range(5)]
    assert [plan(out) for out, _ in steps] == [
        [("a", 0, 8, False)],
        [("a", 8, 8, False)],
        [("a", 16, 4, True), ("b", 0, 4, False)],
        [("a", 20, 1, True), ("b", 4, 6, True)],
        [("a", 21, 1, True), ("b", 10, 1, True)],
    ]
    assert [out.total_num_scheduled_tokens for out, _ in steps] == [8, 8, 8, 7, 2]
    assert [tokens_of(outputs) for _, outputs in steps] == [
        {},
        {},
        {"a": [120]},
        {"a": [121], "b": [210]},
        {"a": [122], "b": [211]},
    ]
    assert steps[0][0].seqs[0].token_ids == list(range(100, 108))
    assert steps[2][0].seqs[1].token_ids == list(range(200, 204))
    assert not sched.has_unfinished_requests()


def test_max_num_seqs_caps_the_running_set() -> None:
    sched, runner = make_scheduler(max_num_seqs=2), FakeRunner(4)
    sched.add_request(make_request("a", [1, 2], max_tokens=1))
    sched.add_request(make_request("b", [3, 4], max_tokens=3))
    sched.add_request(make_request("c", [5, 6], max_tokens=2))
    sched.add_request(make_request("d", [7, 8], max_tokens=1))

    out, _ = step(sched, runner)
    assert plan(out) == [("a", 0, 2, True), ("b", 0, 2, True)]
    stats = sched.make_stats()
    assert (stats.num_running_reqs, stats.num_waiting_reqs) == (1, 2)  # a finished

    out, _ = step(sched, runner)
    assert plan(out) == [("b", 2, 1, True), ("c", 0, 2, True)]
    out, _ = step(sched, runner)
    assert plan(out) == [("b", 3, 1, True), ("c", 2, 1, True)]
    out, _ = step(sched, runner)
    assert plan(out) == [("d", 0, 2, True)]
    assert not sched.has_unfinished_requests()


def test_prefix_hit_skips_cached_blocks() -> None:
    sched, runner = make_scheduler(block_size=16), FakeRunner(16)
    sched.add_request(make_request("a", list(range(50)), max_tokens=1))
    step(sched, runner)
    second = make_request("b", [*range(48), 900, 901, 902, 903, 904], max_tokens=1)
    sched.add_request(second)
    out = sched.schedule()
    assert plan(out) == [("b", 48, 5, True)]
    assert second.num_computed_tokens == 48
    assert second.num_cached_tokens == 48
    assert out.seqs[0].block_ids == [0, 1, 2, 4]
    assert out.seqs[0].token_ids == [900, 901, 902, 903, 904]
    [output] = sched.update_from_output(out, runner.execute_model(out))
    assert output.new_token_ids == [905]
    assert (output.num_prompt_tokens, output.num_cached_tokens) == (53, 48)
    stats = sched.make_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (50 + 53, 48)
    stats = sched.make_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (0, 0)


# -- stopping ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("eos", "params", "tokens", "finish_reason", "stop_reason"),
    [
        (8, {"max_tokens": 10}, [6, 7, 8], "stop", None),
        (8, {"max_tokens": 5, "ignore_eos": True}, [6, 7, 8, 9, 10], "length", None),
        (8, {"max_tokens": 10, "stop_token_ids": [7]}, [6, 7], "stop", 7),
        (8, {"max_tokens": 10, "stop_token_ids": [7], "ignore_eos": True}, [6, 7], "stop", 7),
        (None, {"max_tokens": 4}, [6, 7, 8, 9], "length", None),
        (6, {"max_tokens": 1}, [6], "stop", None),
        (100, {"max_tokens": 100}, [6, 7, 8, 9, 10, 11], "length", None),  # max_model_len
    ],
)
def test_stop_conditions(
    eos: int | None,
    params: dict,
    tokens: list[int],
    finish_reason: str,
    stop_reason: int | None,
) -> None:
    sched, runner = make_scheduler(max_model_len=12), FakeRunner(4)
    request = make_request("r", [0, 1, 2, 3, 4, 5], eos_token_id=eos, **params)
    sched.add_request(request)
    outputs = run_all(sched, runner)["r"]
    assert [t for o in outputs for t in o.new_token_ids] == tokens
    assert [o.finish_reason for o in outputs] == [None] * (len(tokens) - 1) + [finish_reason]
    assert outputs[-1].stop_reason == stop_reason
    assert [o.num_output_tokens for o in outputs] == list(range(1, len(tokens) + 1))
    assert (
        request.status
        == {
            "stop": RequestStatus.FINISHED_STOPPED,
            "length": RequestStatus.FINISHED_LENGTH_CAPPED,
        }[finish_reason]
    )
    assert sched.kv.block_pool.num_free_blocks == sched.kv.num_blocks
    assert sched.schedule().finished_req_ids == {"r"}


# -- aborts ------------------------------------------------------------------------------------


def test_abort_running_request_frees_its_blocks() -> None:
    sched, runner = make_scheduler(num_blocks=8), FakeRunner(4)
    sched.add_request(make_request("a", list(range(10)), max_tokens=5))
    sched.add_request(make_request("b", list(range(20, 25)), max_tokens=5))
    out, _ = step(sched, runner)
    assert sched.kv.get_block_ids("a") == [0, 1, 2]
    assert out.kv_usage == 5 / 8
    assert sched.make_stats().kv_cache_usage == 5 / 8
    request = sched.requests["a"]

    assert sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED) == ["a"]
    assert request.status == RequestStatus.FINISHED_ABORTED
    assert sched.kv.get_block_ids("a") == []
    assert sched.make_stats().kv_cache_usage == 2 / 8
    assert sched.running == [sched.requests["b"]]
    assert sched.finish_requests(["a", "nope"], RequestStatus.FINISHED_ABORTED) == []
    out, _ = step(sched, runner)
    assert plan(out) == [("b", 5, 1, True)]
    assert out.finished_req_ids == {"a"}


def test_abort_waiting_and_preempted_requests() -> None:
    sched, runner = make_scheduler(num_blocks=4, max_num_seqs=1), FakeRunner(4)
    sched.add_request(make_request("a", [1, 2], max_tokens=2))
    sched.add_request(make_request("b", [3, 4], max_tokens=2))
    step(sched, runner)
    assert sched.finish_requests(["b"], RequestStatus.FINISHED_ABORTED) == ["b"]
    assert list(sched.waiting) == []
    out, _ = step(sched, runner)
    assert plan(out) == [("a", 2, 1, True)]
    assert out.finished_req_ids == {"b"}
    assert not sched.has_unfinished_requests()

    # A preempted request sits in the waiting queue and can be aborted there too.
    sched, runner = make_scheduler(num_blocks=4), FakeRunner(4)
    sched.add_request(make_request("a", list(range(5)), max_tokens=8))
    sched.add_request(make_request("b", list(range(50, 58)), max_tokens=8))
    step(sched, runner)
    out, _ = step(sched, runner)
    assert out.preempted_req_ids == {"b"}
    assert sched.finish_requests(["b"], RequestStatus.FINISHED_ABORTED) == ["b"]
    assert not sched.waiting
    assert sched.kv.get_block_ids("b") == []


def test_abort_during_a_step_drops_its_output() -> None:
    sched, runner = make_scheduler(), FakeRunner(4)
    sched.add_request(make_request("a", [1, 2], max_tokens=4))
    sched.add_request(make_request("b", [5, 6], max_tokens=4))
    out = sched.schedule()
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    outputs = sched.update_from_output(out, runner.execute_model(out))
    assert tokens_of(outputs) == {"b": [7]}
    assert sched.kv.block_pool.num_free_blocks == sched.kv.num_blocks - 1


def test_duplicate_request_id_is_rejected() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", [1]))
    with pytest.raises(ValueError, match="already in the engine"):
        sched.add_request(make_request("a", [2]))


# -- preemption --------------------------------------------------------------------------------


def test_preemption_frees_the_last_running_request() -> None:
    sched, runner = make_scheduler(num_blocks=4), FakeRunner(4)
    sched.add_request(make_request("a", list(range(6)), max_tokens=10))
    sched.add_request(make_request("b", list(range(50, 56)), max_tokens=10))
    for _ in range(3):  # 6 -> 9 tokens each; positions 6 and 7 still fit two blocks
        out, _ = step(sched, runner)
        assert out.preempted_req_ids == set()
    assert sched.kv.get_block_ids("a") == [0, 1]
    assert sched.kv.get_block_ids("b") == [2, 3]
    sched.kv.take_events()
    victim = sched.requests["b"]
    late = make_request("c", [70], max_tokens=1)
    sched.add_request(late)

    out, _ = step(sched, runner)  # a needs a third block: b goes, ahead of c
    assert plan(out) == [("a", 8, 1, True)]
    assert out.preempted_req_ids == {"b"}
    assert victim.status == RequestStatus.PREEMPTED
    assert (victim.num_computed_tokens, victim.num_preemptions) == (0, 1)
    assert list(sched.waiting) == [victim, late]
    assert sched.running == [sched.requests["a"]]
    assert sched.kv.get_block_ids("a") == [0, 1, 3]
    assert sched.kv.get_block_ids("b") == []
    # b's tail block is reused first; its head block stays cached.
    assert sched.kv.take_events()[0] == BlockRemoved(
        block_hashes=[victim.block_hashes[1]], medium="GPU"
    )
    assert sched.make_stats().num_preemptions == 1
    assert sched.make_stats().num_preemptions == 0

    by_req = run_all(sched, runner)
    assert [t for o in by_req["a"] for t in o.new_token_ids] == list(range(10, 16))
    assert [t for o in by_req["b"] for t in o.new_token_ids] == list(range(59, 66))
    assert victim.output_token_ids == list(range(56, 66))
    assert [t for o in by_req["c"] for t in o.new_token_ids] == [71]


def test_request_that_cannot_grow_preempts_itself() -> None:
    clock = Clock()
    sched, runner = make_scheduler(num_blocks=4, clock=clock), FakeRunner(4)
    sched.add_request(make_request("a", list(range(5)), max_tokens=3))
    sched.add_request(make_request("b", list(range(50, 58)), max_tokens=3))
    clock.now = 1.0
    step(sched, runner)
    clock.now = 2.0
    out, outputs = step(sched, runner)
    assert plan(out) == [("a", 5, 1, True)]
    assert out.preempted_req_ids == {"b"}
    assert tokens_of(outputs) == {"a": [6]}
    assert sched.kv.get_block_ids("b") == []
    out, _ = step(sched, runner)  # a finishes
    assert plan(out) == [("a", 6, 1, True)]
    # b comes back on its own cached blocks and recomputes only its last token.
    out, outputs = step(sched, runner)
    assert plan(out) == [("b", 8, 1, True)]
    assert sched.kv.get_block_ids("b") == [2, 3, 1]
    by_req = run_all(sched, runner)
    b_outputs = outputs + by_req["b"]
    assert [t for o in b_outputs for t in o.new_token_ids] == [59, 60]
    assert [o.num_cached_tokens for o in b_outputs] == [0, 0]  # from the first admission
    assert b_outputs[-1].finish_reason == "length"
    assert b_outputs[-1].times.first_scheduled_s == 1.0  # not reset by the preemption
    assert sched.requests == {}


def test_no_admission_in_a_step_that_preempts() -> None:
    # Without prefix caching the victim's freed blocks are plain free blocks.
    sched = make_scheduler(num_blocks=4, max_num_batched_tokens=4, enable_caching=False)
    runner = FakeRunner(4)
    sched.add_request(make_request("a", list(range(100, 107)), max_tokens=6))
    sched.add_request(make_request("c", list(range(200, 205)), max_tokens=6))
    plans = [plan(step(sched, runner)[0]) for _ in range(3)]
    assert plans == [
        [("a", 0, 4, False)],
        [("a", 4, 3, True), ("c", 0, 1, False)],
        [("a", 7, 1, True), ("c", 1, 3, False)],
    ]
    out, _ = step(sched, runner)
    # a takes the last free block; c cannot grow and goes. c's first 3 tokens would fit the
    # block it freed, but a step that preempts admits nobody.
    assert plan(out) == [("a", 8, 1, True)]
    assert out.preempted_req_ids == {"c"}
    assert sched.kv.block_pool.num_free_blocks == 1
    out, _ = step(sched, runner)
    assert plan(out) == [("a", 9, 1, True), ("c", 0, 3, False)]
    by_req = run_all(sched, runner)
    assert [t for o in by_req["c"] for t in o.new_token_ids] == list(range(205, 211))


def test_preempted_requests_lookups_are_not_counted_as_prefix_hits() -> None:
    sched, runner = make_scheduler(num_blocks=4), FakeRunner(4)
    sched.add_request(make_request("a", list(range(5)), max_tokens=3))
    sched.add_request(make_request("b", list(range(50, 58)), max_tokens=3))
    run_all(sched, runner)
    assert sched.requests == {}
    stats = sched.make_stats()
    assert stats.num_preemptions == 1
    # Only the first lookup of each request counts; b's re-lookup hit its own blocks.
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (5 + 8, 0)


def _random_workload(seed: int, num_requests: int) -> list[tuple[int, Request]]:
    """(arrival step, request) with prompts sharing a few prefixes."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randrange(4, 24))] for _ in range(4)]
    workload = []
    for i in range(num_requests):
        prompt = rng.choice(prefixes) + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 16))]
        max_tokens = rng.randrange(1, 24)
        # Stop on tokens the request will produce, so some requests do stop early.
        unstopped, _ = reference(prompt, SamplingParams(max_tokens=max_tokens), mix)
        stop = [rng.choice(unstopped)] if rng.random() < 0.3 else []
        eos = rng.choice(unstopped) if rng.random() < 0.3 else None
        params = {"max_tokens": max_tokens, "stop_token_ids": stop}
        workload.append((rng.randrange(20), make_request(f"r{i}", prompt, eos, **params)))
    return sorted(workload, key=lambda pair: pair[0])


def _clone(request: Request) -> Request:
    return Request(
        request.request_id,
        list(request.prompt_token_ids),
        request.sampling_params,
        eos_token_id=request.eos_token_id,
    )


def _run_workload(
    sched: Scheduler, runner: FakeRunner, workload: list[tuple[int, Request]], on_step: Callable
) -> dict[str, list[EngineCoreOutput]]:
    by_req: dict[str, list[EngineCoreOutput]] = defaultdict(list)
    pending = list(workload)
    for step_no in itertools.count():
        while pending and pending[0][0] <= step_no:
            sched.add_request(_clone(pending.pop(0)[1]))
        if not pending and not sched.has_unfinished_requests():
            return by_req
        assert step_no < 5000, "workload did not finish"
        out, outputs = step(sched, runner)
        on_step(out, outputs)
        for o in outputs:
            assert not by_req[o.request_id] or not by_req[o.request_id][-1].finished
            by_req[o.request_id].append(o)
    raise AssertionError("unreachable")


def test_preemption_under_a_tiny_pool_keeps_every_output_identical() -> None:
    workload = _random_workload(seed=7, num_requests=32)
    config = {"block_size": 4, "max_num_seqs": 8, "max_num_batched_tokens": 32}
    max_model_len = 64

    alone: dict[str, tuple[list[int], str]] = {}
    for _, request in workload:
        sched = make_scheduler(num_blocks=64, max_model_len=max_model_len, **config)
        sched.add_request(_clone(request))
        outputs = run_all(sched, FakeRunner(4, mix))[request.request_id]
        alone[request.request_id] = (
            [t for o in outputs for t in o.new_token_ids],
            outputs[-1].finish_reason,
        )
        assert alone[request.request_id] == reference(
            request.prompt_token_ids,
            request.sampling_params,
            mix,
            request.eos_token_id,
            max_model_len,
        )

    sched = make_scheduler(num_blocks=16, max_model_len=max_model_len, **config)
    num_preempted = 0

    def check_step(out: SchedulerOutput, outputs: list[EngineCoreOutput]) -> None:
        nonlocal num_preempted
        num_preempted += len(out.preempted_req_ids)
        assert out.total_num_scheduled_tokens <= 32
        assert len(out.seqs) <= 8 and len(sched.running) <= 8
        assert out.kv_usage <= 1.0

    by_req = _run_workload(sched, FakeRunner(4, mix), workload, check_step)
    together = {
        req_id: ([t for o in outs for t in o.new_token_ids], outs[-1].finish_reason)
        for req_id, outs in by_req.items()
    }
    assert together == alone
    assert num_preempted >= 10
    assert {"stop", "length"} <= {reason for _, reason in alone.values()}
    assert sched.requests == {}
    assert sched.kv.req_to_blocks == {}
    assert sched.kv.block_pool.num_free_blocks == 16
    assert sched.make_stats().kv_cache_usage == 0.0


def test_kv_events_rebuild_the_cached_set_while_scheduling() -> None:
    sched = make_scheduler(num_blocks=20, block_size=4, max_num_batched_tokens=24)
    runner = FakeRunner(4, mix)
    tracker = BlockSetTracker()
    rebuilt: set[int] = set()
    num_removed = 0

    def check_step(out: SchedulerOutput, outputs: list[EngineCoreOutput]) -> None:
        nonlocal num_removed
        events = sched.kv.take_events()
        tracker.apply(events)
        for event in events:
            if isinstance(event, BlockStored):
                rebuilt.update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                num_removed += len(event.block_hashes)
                rebuilt.difference_update(event.block_hashes)
            else:
                rebuilt.clear()
        assert rebuilt == sched.kv.block_pool.cached_block_hashes()
        assert tracker.held_hashes("GPU") == rebuilt

    _run_workload(sched, runner, _random_workload(seed=11, num_requests=40), check_step)
    assert num_removed >= 20
    assert sched.kv.reset_prefix_cache()
    check_step(sched.schedule(), [])
    assert rebuilt == set()


def test_request_times_follow_the_clock() -> None:
    clock = Clock()
    sched, runner = make_scheduler(max_num_batched_tokens=4, clock=clock), FakeRunner(4)
    sched.add_request(make_request("a", list(range(6)), max_tokens=2))
    clock.now = 1.0
    assert step(sched, runner)[1] == []
    clock.now = 2.0
    _, [first] = step(sched, runner)
    clock.now = 3.0
    _, [last] = step(sched, runner)
    assert first.times is last.times
    times = last.times
    assert (times.arrival_s, times.first_scheduled_s) == (0.0, 1.0)
    assert (times.first_token_s, times.last_token_s) == (2.0, 3.0)
    assert last.finished


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_aborts_lose_nothing_and_leak_no_blocks(seed: int) -> None:
    rng = random.Random(seed)
    workload = _random_workload(seed=seed, num_requests=24)
    sched = make_scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=16)
    aborted: set[str] = set()

    def check_step(out: SchedulerOutput, outputs: list[EngineCoreOutput]) -> None:
        holders: dict[int, int] = defaultdict(int)
        for blocks in sched.kv.req_to_blocks.values():
            for block in blocks:
                holders[block.block_id] += 1
        assert [b.ref_cnt for b in sched.kv.block_pool.blocks] == [holders[i] for i in range(16)]
        assert set(sched.kv.req_to_blocks) == {r.request_id for r in sched.running}
        if sched.requests and rng.random() < 0.1:
            req_id = rng.choice(sorted(sched.requests))
            assert sched.finish_requests([req_id], RequestStatus.FINISHED_ABORTED) == [req_id]
            aborted.add(req_id)

    by_req = _run_workload(sched, FakeRunner(4, mix), workload, check_step)
    assert len(aborted) >= 2
    for _, request in workload:
        expected, finish_reason = reference(
            request.prompt_token_ids, request.sampling_params, mix, request.eos_token_id
        )
        outputs = by_req.get(request.request_id, [])
        got = [t for o in outputs for t in o.new_token_ids]
        if request.request_id in aborted:
            assert got == expected[: len(got)]
            assert all(not o.finished for o in outputs)
        else:
            assert (got, outputs[-1].finish_reason) == (expected, finish_reason)
    assert sched.kv.block_pool.num_free_blocks == 16
    assert sched.kv.req_to_blocks == {}
