"""Replicas for a load: the margin above the load a pool is given. Pure: no I/O, no clock.

``load`` is the offered load in replicas: the request rate over what one replica sustains
inside the SLA (``capacity.py``, already at ``target_utilization``). A pool is then sized

    replicas = ceil(headroom * load + sqrt_headroom * sqrt(load))

* ``headroom`` (multiplicative): a margin in proportion to the load;
* ``sqrt_headroom`` (square-root staffing, Halfin-Whitt's ``beta``): a margin that grows as the
  square root of the load, the size of Poisson fluctuations; a large pool needs relatively less
  of it than a small one.

With ``headroom = 1`` and ``sqrt_headroom = 0`` this is the load rounded up.
"""

from __future__ import annotations

import math


def size_for(load: float, headroom: float = 1.0, sqrt_headroom: float = 0.0) -> float:
    """``headroom * load + sqrt_headroom * sqrt(load)`` replicas, not rounded; 0 for no load."""
    if load <= 0:
        return 0.0
    return headroom * load + sqrt_headroom * math.sqrt(load)


def replicas_for(load: float, headroom: float = 1.0, sqrt_headroom: float = 0.0) -> int:
    """``size_for`` rounded up. A hair above an integer (floating-point noise, 1e-9) does not
    add a replica."""
    return math.ceil(size_for(load, headroom, sqrt_headroom) - 1e-9)
