"""Conditional disaggregation: the decision rule, and prefill routing kept apart from decode."""

from __future__ import annotations

import pytest

from serving.frontend.metrics import FrontendMetrics
from serving.frontend.router import Router
from serving.router.disagg import DisaggConfig, DisaggDecision, decide

DEFAULT = DisaggConfig()


@pytest.mark.parametrize(
    ("prompt", "cached", "prefill_workers", "expected"),
    [
        # Uncached 100 of 3,000 (3%): short and under 70% -> the decode worker prefills.
        (3000, 2900, 1, DisaggDecision.LOCAL_SHORT),
        # A fresh prompt is 100% uncached: remote, however short (the rule's second half).
        (200, 0, 1, DisaggDecision.REMOTE),
        # Uncached 1,000 of 1,200 (83% >= 70%): remote.
        (1200, 200, 2, DisaggDecision.REMOTE),
        # Uncached 2,048 (not < 2,048) of 10,000: remote.
        (10_000, 7952, 1, DisaggDecision.REMOTE),
        # Uncached 2,047 of 10,000: local.
        (10_000, 7953, 1, DisaggDecision.LOCAL_SHORT),
        # Would be remote, but no prefill worker is healthy.
        (5000, 0, 0, DisaggDecision.LOCAL_NO_PREFILL_WORKER),
    ],
)
def test_decision_rule(prompt: int, cached: int, prefill_workers: int, expected) -> None:
    assert decide(prompt, cached, prefill_workers, DEFAULT) is expected


def test_zero_threshold_sends_everything_remote() -> None:
    config = DisaggConfig(max_local_prefill_tokens=0)
    assert decide(5000, 4999, 1, config) is DisaggDecision.REMOTE


@pytest.mark.parametrize("kwargs", [{"max_local_prefill_tokens": -1},
                                    {"max_local_prefill_fraction": 1.5}])  # fmt: skip
def test_bad_config_is_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DisaggConfig(**kwargs)


def test_prefill_routing_does_not_advance_the_decode_cursor() -> None:
    """Round-robin over 2 decode workers with a prefill decision between every two decode
    decisions: the decode choices must still alternate."""
    router = Router("round-robin", 16, FrontendMetrics("m"))
    decode_choices = []
    for i in range(6):
        decision = router.route(f"r{i}", [1, 2, 3], ["d0", "d1"])
        decode_choices.append(decision.worker_id)
        router.route(f"r{i}#prefill", [1, 2, 3], ["p0"], prefill=True)
    assert decode_choices == ["d0", "d1"] * 3
