"""Replicas for a load: multiplicative and square-root margins (``serving/planner/sizing.py``)."""

from __future__ import annotations

from serving.planner.sizing import replicas_for


def test_plain_sizing_rounds_the_load_up() -> None:
    assert replicas_for(0.0) == 0
    assert replicas_for(2.0) == 2  # exactly two replicas' worth: no third
    assert replicas_for(2.0 + 1e-12) == 2  # floating-point noise above an integer
    assert replicas_for(2.01) == 3
    assert replicas_for(1.6, headroom=1.25) == 2


def test_square_root_margin_is_relatively_larger_for_a_small_pool() -> None:
    # beta = 1: 4 + 2 = 6 replicas for a load of 4 (+50%), 100 + 10 = 110 for 100 (+10%).
    assert replicas_for(4.0, sqrt_headroom=1.0) == 6
    assert replicas_for(100.0, sqrt_headroom=1.0) == 110
    # Both margins add: 1.1 * 9 + 0.5 * 3 = 11.4 -> 12.
    assert replicas_for(9.0, headroom=1.1, sqrt_headroom=0.5) == 12
