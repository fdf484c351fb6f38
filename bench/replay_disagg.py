"""Disaggregated prefill/decode in the offline replay: remote prefill, KV pulls, leases.

``bench.replay.OfflineReplay`` routes every request to an engine that decodes. With prefill
engines present, ``DisaggFlow`` decides, as the frontend does (``serving/frontend/app.py``
``_maybe_remote_prefill``), whether a prompt is computed on a prefill engine, then carries it
over: the prefill engine's lease, the decode engine's KV pull (it lands after a modelled
transfer time), and the lease's release or expiry. ``DisaggStats`` counts what this costs and
makes the report's P/D figures. See ``docs/replay.md``.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench.trace import TraceRequest
from serving.engine.kv_transfer import KVPull
from serving.engine.outputs import EngineCoreOutput
from serving.engine.request import Request, SamplingParams
from serving.router.disagg import (
    DisaggConfig,
    DisaggDecision,
    decide,
    prefill_request_params,
)
from serving.router.policies import RequestView, RoutingPolicy, route_request

if TYPE_CHECKING:  # types only: bench.replay imports this module
    from bench.replay import OfflineReplay

PREFILL_SUFFIX = "/prefill"  # engine request id of a request's remote prefill

# Summarizes samples as ``{"p50": ..., "p99": ...}`` (``bench.replay`` passes its own, so that
# these figures are computed like the rest of the report).
Percentiles = Callable[[Sequence[float], Sequence[int]], dict[str, float]]


@dataclass(slots=True)
class _RemotePrefill:
    """A request whose prompt a prefill worker is computing; the decode side waits for it."""

    request_id: str
    decode_worker: int
    prompt: list[int]
    max_tokens: int
    arrival_s: float


@dataclass
class DisaggStats:
    """What a replay with prefill/decode pools counts besides the aggregated figures."""

    decisions: Counter[str] = field(default_factory=Counter)
    decision_of: dict[str, str] = field(default_factory=dict)  # by request id
    pull_s: array = field(default_factory=lambda: array("d"))
    pull_tokens: int = 0
    pull_bytes: int = 0
    pulls_failed: int = 0
    leases_expired: int = 0
    decode_hit_tokens: int = 0  # remote requests: prompt tokens the decode engine had cached

    def record(self, request_id: str, decision: DisaggDecision) -> None:
        previous = self.decision_of.get(request_id)
        if previous is not None:
            self.decisions[previous] -= 1
        self.decisions[decision.value] += 1
        self.decision_of[request_id] = decision.value

    def to_dict(
        self, ttft_by_request: dict[str, float], percentiles: Percentiles
    ) -> dict[str, Any]:
        order = [d.value for d in DisaggDecision]
        by_decision: dict[str, list[float]] = {}
        for request_id, ttft in ttft_by_request.items():
            by_decision.setdefault(self.decision_of[request_id], []).append(ttft)
        return {
            "disagg_decisions": {d: self.decisions[d] for d in order if self.decisions[d]},
            "ttft_s_by_decision": {
                d: percentiles(by_decision[d], (50, 99)) for d in order if d in by_decision
            },
            "kv_transfer": {
                "pulls": len(self.pull_s),
                "tokens": self.pull_tokens,
                "bytes": self.pull_bytes,
                "time_s_total": float(sum(self.pull_s)),
                "time_s": percentiles(self.pull_s, (50, 99)),
                "failed": self.pulls_failed,
                "decode_side_hit_tokens": self.decode_hit_tokens,
            },
            "leases_expired": self.leases_expired,
        }


class DisaggFlow:
    """Owns one replay's P/D flow: the prefill policy, remote prefills in flight, KV pulls,
    lease expiry and their counts (``stats``).

    Keeps no clock, heap or engine of its own: it works on the ``OfflineReplay`` it belongs to
    (its engines, load, virtual ``now``) and asks it to wake engines, schedule a pull's
    landing and count requests. Never decides where a request decodes: the replay's policy
    does.
    """

    def __init__(self, replay: OfflineReplay, prefill_policy: RoutingPolicy | None) -> None:
        self._replay = replay
        # The same policy as the replay's, its own instance (round-robin counter, approx index,
        # RNG): one shared round-robin counter would alternate decode and prefill turns and,
        # with an even number of decode engines, skip half of them. Load and KV index are
        # shared.
        self._prefill_policy = prefill_policy
        self._config = DisaggConfig(
            replay.config.max_local_prefill_tokens, replay.config.max_local_prefill_fraction
        )
        self._remote: dict[str, _RemotePrefill] = {}  # by prefill engine request id
        self.stats = DisaggStats()

    # -- routing -------------------------------------------------------------------------------

    def try_remote_prefill(
        self,
        r: TraceRequest,
        prompt: list[int],
        hashes: Sequence[int],
        decode_worker: int,
        num_cached_blocks: int,
    ) -> bool:
        """Decide where the prompt of a request routed to ``decode_worker`` is computed, and
        record it. True when a prefill engine took it; False when the decode engine prefills
        (the decision said so, or the prefill engine refused the request)."""
        replay = self._replay
        request_id = str(r.index)
        # As the frontend decides (serving/frontend/app.py ``_maybe_remote_prefill``).
        if replay.prefill_ids:
            cached = min(num_cached_blocks * replay.config.block_size, len(prompt))
            choice = decide(len(prompt), cached, len(replay.prefill_ids), self._config)
        else:
            choice = DisaggDecision.AGGREGATED
        self.stats.record(request_id, choice)
        if choice.is_remote:
            if self._start_remote_prefill(r, prompt, hashes, decode_worker):
                return True
            self.stats.record(request_id, DisaggDecision.LOCAL_PREFILL_FAILED)
        return False

    def _start_remote_prefill(
        self, r: TraceRequest, prompt: list[int], hashes: Sequence[int], decode_worker: int
    ) -> bool:
        """Route the prompt to a prefill engine as a ``max_tokens=1`` request whose blocks it
        leases. False when that engine refuses it (the decode engine then prefills)."""
        assert self._prefill_policy is not None
        replay = self._replay
        request_id = str(r.index)
        prefill_id = request_id + PREFILL_SUFFIX
        view = RequestView(prefill_id, len(prompt), hashes)
        decision = route_request(self._prefill_policy, replay.load, view, replay.prefill_ids)
        worker = replay.worker_index[decision.worker_id]
        request = Request(
            prefill_id,
            prompt,
            SamplingParams(max_tokens=1, ignore_eos=True),
            eos_token_id=None,
            arrival_time_s=replay.now,
            kv_transfer_params=prefill_request_params(),
        )
        try:
            replay.engines[worker].add_request(request)
        except ValueError:
            replay.load.finish_request(prefill_id)
            return False
        self._remote[prefill_id] = _RemotePrefill(
            request_id, decode_worker, prompt, r.output_length, replay.now
        )
        # The prompt is computed on the prefill engine; the request is served by the decode one.
        replay.admit(
            request_id,
            len(prompt),
            decision.num_cached_blocks,
            computed_on=worker,
            served_on=decode_worker,
            remote=True,
        )
        return True

    # -- engine results ------------------------------------------------------------------------

    def on_prefill_output(self, worker: int, out: EngineCoreOutput) -> None:
        """A prefill engine's (only) token: its blocks are leased; the decode side takes over.

        The token is not the client's: the decode engine samples the first token again from
        the last prompt position, which it recomputes.
        """
        replay = self._replay
        remote = self._remote.pop(out.request_id)
        replay.load.finish_request(out.request_id)
        replay.count_cached_tokens(out.num_cached_tokens)
        params = out.kv_transfer_params
        if not out.finished or not params or not params.get("do_remote_prefill"):
            raise RuntimeError(f"prefill {out.request_id} returned no KV lease: {params}")
        request = Request(
            remote.request_id,
            remote.prompt,
            SamplingParams(max_tokens=remote.max_tokens, ignore_eos=True),
            eos_token_id=None,
            arrival_time_s=remote.arrival_s,
            kv_transfer_params={**params, "remote_engine_id": replay.worker_ids[worker]},
        )
        try:
            replay.engines[remote.decode_worker].add_request(request)
        except ValueError:
            self._release_lease(worker, out.request_id)
            replay.reject(remote.request_id)
            return
        replay.wake(remote.decode_worker)

    def start_pulls(self, worker: int, pulls: Sequence[KVPull]) -> None:
        """The decode engine planned pulls in the step starting now: each lands after
        ``tokens * kv_bytes_per_token / bandwidth`` (links do not contend)."""
        replay = self._replay
        engine = replay.engines[worker]
        bytes_per_s = replay.config.kv_bandwidth_gbps * 1e9
        bytes_per_token = engine.executor.kv_bytes_per_token
        stats = self.stats
        for pull in pulls:
            source = replay.worker_index[pull.source.engine_id]
            held = replay.engines[source].scheduler.leases.get(pull.source.request_id)
            if held is None or held.lease.expires_at_s <= replay.now:
                # The lease ran out before the decode engine got to the request.
                if held is not None:
                    self.expire_leases(source)
                engine.finish_kv_pull(pull.request_id, succeeded=False)
                stats.pulls_failed += 1
                continue
            num_bytes = pull.num_tokens * bytes_per_token
            seconds = num_bytes / bytes_per_s
            stats.pull_tokens += pull.num_tokens
            stats.pull_bytes += num_bytes
            stats.pull_s.append(seconds)
            replay.schedule_pull_done(replay.now + seconds, (worker, source, pull))

    def on_pull_done(self, payload: tuple[int, int, KVPull]) -> None:
        worker, source, pull = payload
        landed = self._release_lease(source, pull.source.request_id)
        if not landed:  # the lease expired during the copy: the blocks may be overwritten
            self.stats.pulls_failed += 1
        self._replay.engines[worker].finish_kv_pull(pull.request_id, succeeded=landed)
        self._replay.wake(worker)

    # -- leases --------------------------------------------------------------------------------

    def _release_lease(self, worker: int, request_id: str) -> bool:
        engine = self._replay.engines[worker]
        released = engine.release_lease(request_id)
        if released and engine.has_unfinished_requests():
            self._replay.wake(worker)
        return released

    def expire_leases(self, worker: int) -> None:
        """Drop ``worker``'s leases that ran out; an engine idling on them steps again."""
        expired = self._replay.engines[worker].expire_leases()
        if expired:
            self.stats.leases_expired += len(expired)
            self._replay.wake_if_stalled(worker)

    # -- results -------------------------------------------------------------------------------

    def figures(
        self, ttft_by_request: dict[str, float], percentiles: Percentiles
    ) -> dict[str, Any]:
        """Where prompts were computed, what the KV pulls cost, and what was left at the end."""
        replay = self._replay
        return {
            "workers": {"ids": list(replay.worker_ids), "roles": list(replay.roles)},
            **self.stats.to_dict(ttft_by_request, percentiles),
            "leases_outstanding_at_end": sum(len(e.scheduler.leases) for e in replay.engines),
        }
