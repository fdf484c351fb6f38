"""PromQL building blocks for dashboard queries, with Grafana's variables (no I/O)."""

from __future__ import annotations

from grafana.panels import Query

RATE = "$__rate_interval"
MODEL = 'model=~"$model"'  # Strata's own metrics
MODEL_NAME = 'model_name=~"$model"'  # vLLM's metric names
# SLO thresholds: each is the `le` value of a bucket of the frontend's histograms.
TTFT_SLO_LE = "2.5"
ITL_SLO_LE = "0.1"
QUANTILES = (0.5, 0.9, 0.99)


def rate(metric: str, selector: str = "") -> str:
    matchers = f"{{{selector}}}" if selector else ""
    return f"rate({metric}{matchers}[{RATE}])"


def quantiles(
    bucket: str, selector: str, by: str = "", qs: tuple[float, ...] = QUANTILES
) -> tuple[Query, ...]:
    """p50/p90/p99 (or ``qs``) of a histogram, optionally per ``by`` label."""
    group = f"{by}, le" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({group}) ({rate(bucket, selector)}))",
            f"{prefix}p{round(q * 100)}",
        )
        for q in qs
    )


def slo_attainment(histogram: str, le: str, selector: str, legend: str) -> Query:
    """Share of observations at or under the SLO bucket ``le`` (1 = every request met it)."""
    good = rate(f"{histogram}_bucket", f'{selector}, le="{le}"')
    total = rate(f"{histogram}_count", selector)
    return Query(f"sum({good}) / sum({total})", legend)


def per_worker_or_zero(expr: str, known_workers: str) -> str:
    """``expr`` per worker, 0 for workers ``known_workers`` lists but ``expr`` has no series
    for (counters that appear on their first increment)."""
    return f"sum by (worker) ({expr}) or sum by (worker) ({known_workers}) * 0"


def slo_attainment_queries(prefix: str = "strata_frontend") -> tuple[Query, Query]:
    """TTFT and ITL attainment of the frontend's SLOs (the thresholds the alert rules use)."""
    itl_ms = f"{float(ITL_SLO_LE) * 1000:g}"
    return (
        slo_attainment(
            f"{prefix}_time_to_first_token_seconds", TTFT_SLO_LE, MODEL, f"TTFT <= {TTFT_SLO_LE} s"
        ),
        slo_attainment(
            f"{prefix}_inter_token_latency_seconds", ITL_SLO_LE, MODEL, f"ITL <= {itl_ms} ms"
        ),
    )
