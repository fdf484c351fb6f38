"""Disaggregated serving: the remote prefill before a decode worker streams the output.

The rule (``serving.router.disagg.decide``) says whether a prompt is prefilled on a prefill
worker; if so, vLLM's prefill request (``max_tokens=1``, ``do_remote_decode``) goes to the
lowest-cost prefill worker and its response's ``kv_transfer_params`` are passed verbatim to the
decode worker, which pulls the blocks.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

from serving.frontend.job import Job, worker_payload
from serving.frontend.models import ModelVersion
from serving.frontend.state import FrontendState
from serving.frontend.worker_errors import passthrough_error
from serving.router.disagg import DisaggDecision, decide, prefill_request_params

logger = logging.getLogger(__name__)


async def maybe_remote_prefill(
    state: FrontendState, version: ModelVersion, job: Job, num_cached_blocks: int
) -> dict[str, Any] | None:
    """Prefill on a prefill worker when the rule says so; the decode worker's kv params.

    Returns None to prefill on the decode worker: the uncached part is short, no prefill worker
    is healthy, the prefill worker failed (marked unhealthy, never fatal), or the request is
    resumed after a migration (the lease was consumed) or carries the client's own params.
    """
    metrics = state.metrics
    prefill_ids = version.pool.prefill_ids()
    if job.num_migrations or job.output_ids or job.body.kv_transfer_params is not None:
        return None
    if not prefill_ids and not any(w.role == "prefill" for w in version.pool.workers.values()):
        metrics.disagg_decisions.labels(model=job.model, decision="aggregated").inc()
        return None
    num_prompt = len(job.prompt_ids)
    cached = min(num_cached_blocks * version.router.block_size, num_prompt)
    decision = decide(num_prompt, cached, len(prefill_ids), state.settings.disagg)
    if decision.is_remote:
        params = await remote_prefill(state, version, job, prefill_ids)
        if params is None:
            decision = DisaggDecision.LOCAL_PREFILL_FAILED
    else:
        params = None
    metrics.disagg_decisions.labels(model=job.model, decision=decision.value).inc()
    return params


async def remote_prefill(
    state: FrontendState, version: ModelVersion, job: Job, prefill_ids: list[str]
) -> dict[str, Any] | None:
    """vLLM's prefill request (max_tokens=1, do_remote_decode) to the lowest-cost prefill
    worker; its response's ``kv_transfer_params``, or None on any failure."""
    assert state.http is not None
    pool, router = version.pool, version.router
    routing_id = f"{job.request_id}#prefill"
    decision = router.route(routing_id, job.prompt_ids, prefill_ids, prefill=True)
    worker = pool.workers[decision.worker_id]
    worker.num_requests += 1
    payload = {
        **worker_payload(job, worker),
        "max_tokens": 1,
        "stream": False,
        # The sampled token is thrown away; what matters is that the request ends length-capped
        # (the only state in which the blocks are leased), so no EOS or stop may end it first.
        "ignore_eos": True,
        "stop": [],
        "stop_token_ids": [],
        "kv_transfer_params": prefill_request_params(),
    }
    payload.pop("stream_options", None)
    started_s = time.monotonic()
    try:
        response = await _post(state.http, f"{worker.url}/v1/completions", payload,
                               {"x-request-id": f"{job.request_id}-prefill"})  # fmt: skip
        if response.status_code >= 500:
            pool.mark_failed(worker.worker_id, f"prefill HTTP {response.status_code}")
            return None
        if response.status_code != 200:
            # The request itself is bad: tell the client.
            raise passthrough_error(response.status_code, response.content)
        params = response.json().get("kv_transfer_params")
    except (httpx.TransportError, ValueError, AttributeError) as exc:  # unreachable, or no JSON
        pool.mark_failed(worker.worker_id, f"prefill failed: {exc!r}")
        return None
    finally:
        router.finish(routing_id)
    state.metrics.remote_prefill_seconds.labels(model=job.model).observe(
        time.monotonic() - started_s
    )
    if not isinstance(params, dict) or not params.get("do_remote_prefill"):
        logger.warning(
            "prefill worker %s returned no kv_transfer_params (no KV transport?): "
            "prefilling on the decode worker",
            worker.worker_id,
        )
        return None
    return params


async def _post(
    http: httpx.AsyncClient, url: str, payload: dict[str, Any], headers: dict[str, str]
) -> httpx.Response:
    """POST, once more on a new connection when a pooled one was closed under the request
    before any answer (the worker's idle close raced this process; see ``WorkerClient``)."""
    try:
        return await http.post(url, json=payload, headers=headers)
    except httpx.RemoteProtocolError:
        return await http.post(url, json=payload, headers=headers)
