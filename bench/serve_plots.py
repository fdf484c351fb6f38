"""Figures for ``strata bench serve`` runs: series from ``run.json`` dicts, drawn with matplotlib.

Series functions are pure (records in, numpy arrays out); ``plot_*`` functions return PNG
bytes (Agg backend, no display). Times on the x axes are seconds since the run's start; TTFT and
ITL are in milliseconds. One run or several (``compare``): every figure with several series has
a legend, named by run label or worker id.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

DPI = 100
PERCENTILES = (50, 90, 99)
_PCT_STYLES = {50: ":", 90: "--", 99: "-."}
_WORKER_STYLES = ("-", "--", "-.", ":")  # equal loads draw over each other: vary the dash too


def _worker_style(i: int) -> dict[str, Any]:
    return {"linestyle": _WORKER_STYLES[i % len(_WORKER_STYLES)], "linewidth": 1.6}


# -- series (pure) ---------------------------------------------------------------------------------


def ok_records(run: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in run["requests"] if r["status_code"] == 200 and r["ttft_s"] is not None]


def ttft_ms(run: dict[str, Any]) -> np.ndarray:
    return np.asarray([r["ttft_s"] * 1000.0 for r in ok_records(run)], dtype=np.float64)


def itl_ms(run: dict[str, Any]) -> np.ndarray:
    return np.asarray([g for r in ok_records(run) for g in r["itl_ms"]], dtype=np.float64)


def token_times_s(record: dict[str, Any]) -> np.ndarray:
    """Each output token's arrival (s since the start): first at TTFT, then one ITL apart."""
    if record["ttft_s"] is None:
        return np.empty(0)
    first = record["sent_s"] + record["ttft_s"]
    gaps_s = np.asarray(record["itl_ms"], dtype=np.float64) / 1000.0
    return first + np.concatenate(([0.0], np.cumsum(gaps_s)))


def throughput_per_s(run: dict[str, Any], bucket_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Output tokens per second in ``bucket_s`` buckets: (bucket starts, tokens/s).

    The last bucket is divided by its covered length, or dropped if under half a bucket.
    """
    records = ok_records(run)
    if not records:
        return np.empty(0), np.empty(0)
    times = np.concatenate([token_times_s(r) for r in records])
    end = float(times.max())
    edges = np.arange(0.0, end + bucket_s, bucket_s)
    counts, _ = np.histogram(times, bins=edges)
    widths = np.minimum(edges[1:], end) - edges[:-1]
    keep = widths >= bucket_s / 2
    return edges[:-1][keep], counts[keep] / widths[keep]


def _edges(starts: np.ndarray, bucket_s: float = 1.0) -> np.ndarray:
    """Bucket edges for ``stairs``: each start, then the last bucket's end."""
    return np.append(starts, starts[-1] + bucket_s) if len(starts) else np.zeros(1)


def in_flight(run: dict[str, Any], times_s: np.ndarray) -> np.ndarray:
    """Requests sent and not yet finished (as the client sees them) at each time."""
    sent = np.sort([r["sent_s"] for r in run["requests"]])
    done = np.sort([r["finished_s"] if r["finished_s"] is not None else r["sent_s"]
                    for r in run["requests"]])  # fmt: skip
    return np.searchsorted(sent, times_s, side="right") - np.searchsorted(done, times_s, "right")


def worker_series(
    worker_load: dict[str, Any],
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Sample times, in-flight requests per worker, and requests routed to each worker since
    the first sample (the frontend's counter may not start at 0: it counts earlier runs)."""
    samples = worker_load["samples"]
    times = np.asarray([s["t_s"] for s in samples], dtype=np.float64)
    workers = sorted({w for s in samples for w in s["active_requests"]})
    active = {w: np.asarray([s["active_requests"].get(w, 0.0) for s in samples]) for w in workers}
    routed: dict[str, np.ndarray] = {}
    for w in workers:
        totals = np.asarray([s["routed_total"].get(w, 0.0) for s in samples])
        routed[w] = totals - totals[0]
    return times, active, routed


def cdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values and the fraction of samples at or below each."""
    xs = np.sort(values)
    return xs, np.arange(1, len(xs) + 1) / max(len(xs), 1)


# -- figures ---------------------------------------------------------------------------------------


def latency_axis(ax: Axes, values_ms: np.ndarray, what: str) -> None:
    """The x axis of a latency CDF: from the 1st percentile (the few gaps of tokens that came in
    one chunk sit near 0 and would squeeze the rest) to the maximum; log scale with plain tick
    labels (10, 20, 50 ms ...) when that spans more than a decade."""
    if not len(values_ms):
        ax.set_xlabel(f"{what} (ms)")
        return
    low, high = float(np.percentile(values_ms, 1)), float(values_ms.max())
    if low > 0 and high > 10 * low:
        subs = (1.0, 2.0, 5.0) if high <= 1000 * low else (1.0,)  # labels must not touch
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(low / 1.1, high * 1.1)
        ax.set_xlabel(f"{what} (ms, log scale, from p1)")
    else:
        ax.set_xlim(low - 0.05 * (high - low), high + 0.05 * (high - low) + 1e-9)
        ax.set_xlabel(f"{what} (ms, from p1)")


def to_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, pil_kwargs={"optimize": True})
    plt.close(fig)
    return buffer.getvalue()


def plot_distribution(values_ms: np.ndarray, what: str, label: str) -> bytes:
    """Histogram (left) and CDF on a log axis (right) of one latency, percentiles marked."""
    fig, (hist, cum) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    fig.suptitle(f"{what} distribution: {label} ({len(values_ms):,} samples)")
    if len(values_ms):
        upper = float(np.percentile(values_ms, 99.5))
        shown = values_ms[values_ms <= upper]
        hist.hist(shown, bins=60, color="tab:blue", alpha=0.8, label=f"{what} (<= p99.5)")
        cum.step(*cdf(values_ms), where="post", color="tab:blue", label=f"{what} CDF")
        for q, value in zip(PERCENTILES, np.percentile(values_ms, PERCENTILES), strict=True):
            for ax in (hist, cum):
                ax.axvline(value, color="black", linestyle=_PCT_STYLES[q], linewidth=1,
                           label=f"p{q} = {value:,.1f} ms")  # fmt: skip
    hist.set(xlabel=f"{what} (ms)", ylabel="requests" if what == "TTFT" else "token gaps",
             title="histogram")  # fmt: skip
    latency_axis(cum, values_ms, what)
    cum.set(ylabel="fraction of samples", ylim=(0, 1.02), title="cumulative distribution")
    for ax in (hist, cum):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    return to_png(fig)


def plot_throughput(run: dict[str, Any]) -> bytes:
    """Output tokens/s per 1 s bucket, and requests in flight on a second axis."""
    starts, rate = throughput_per_s(run)
    fig, ax = plt.subplots(figsize=(11, 4.2), layout="constrained")
    tokens = [ax.stairs(rate, _edges(starts), color="tab:blue", linewidth=1.5,
                        label="output tokens/s")]  # fmt: skip
    ax.set(xlabel="time since start (s)", ylabel="output tokens/s (1 s buckets)",
           title=f"Throughput over time: {run['label']}")  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    right = ax.twinx()
    grid = np.linspace(0.0, float(starts[-1]) + 1.0 if len(starts) else 1.0, 400)
    flight = right.plot(grid, in_flight(run, grid), color="tab:orange", alpha=0.8,
                        label="requests in flight (client)")  # fmt: skip
    right.set_ylabel("requests in flight")
    right.set_ylim(bottom=0)
    lines = tokens + flight
    fig.legend(lines, [line.get_label() for line in lines], loc="outside lower center", ncols=2)
    return to_png(fig)


def plot_worker_load(worker_load: dict[str, Any], label: str) -> bytes:
    """Per worker: requests in flight (top) and requests routed so far (bottom)."""
    times, active, routed = worker_series(worker_load)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True, layout="constrained")
    policies = ", ".join(worker_load.get("policies") or []) or "unknown"
    fig.suptitle(f"Per-worker load (frontend /metrics every {worker_load['interval_s']} s): "
                 f"{label}, router {policies}")  # fmt: skip
    for i, w in enumerate(active):
        top.step(times, active[w], where="post", label=f"worker {w}", **_worker_style(i))
        bottom.step(times, routed[w], where="post", label=f"worker {w}", **_worker_style(i))
    top.set(ylabel="requests in flight", title="in-flight requests per worker (router's count)")
    bottom.set(xlabel="time since start (s)", ylabel="requests (cumulative)",
               title="requests routed to each worker since the start")  # fmt: skip
    for ax in (top, bottom):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    _figure_legend(fig, [top])
    return to_png(fig)


def _figure_legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend under the plots (never over the data), each label once."""
    by_label: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            by_label.setdefault(label, handle)
    fig.legend(by_label.values(), by_label.keys(), loc="outside lower center",
               ncols=min(len(by_label), 4))  # fmt: skip


# -- compare ---------------------------------------------------------------------------------------


def plot_cdfs(runs: Sequence[dict[str, Any]], what: str) -> bytes:
    """One CDF per run of TTFT or ITL (ms, log axis)."""
    values = ttft_ms if what == "TTFT" else itl_ms
    fig, ax = plt.subplots(figsize=(11, 4.5), layout="constrained")
    everything = []
    for run in runs:
        samples = values(run)
        if len(samples):
            p50, p99 = np.percentile(samples, (50, 99))
            label = f"{run['label']} (p50 {p50:,.1f} ms, p99 {p99:,.1f} ms)"
            ax.step(*cdf(samples), where="post", label=label)
            everything.append(samples)
    latency_axis(ax, np.concatenate(everything) if everything else np.empty(0), what)
    ax.set(ylabel="fraction of samples", ylim=(0, 1.02),
           title=f"{what} cumulative distribution per run")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    return to_png(fig)


def plot_throughput_compare(runs: Sequence[dict[str, Any]]) -> bytes:
    fig, ax = plt.subplots(figsize=(11, 4.5), layout="constrained")
    for run in runs:
        starts, rate = throughput_per_s(run)
        ax.stairs(rate, _edges(starts), linewidth=1.5, label=run["label"])
    ax.set(xlabel="time since start (s)", ylabel="output tokens/s (1 s buckets)",
           title="Throughput over time per run")  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _figure_legend(fig, [ax])
    return to_png(fig)


def plot_worker_load_compare(runs: Sequence[dict[str, Any]]) -> bytes:
    """In-flight requests per worker over time, one panel per run (same y scale)."""
    with_load = [r for r in runs if r.get("worker_load")]
    height_in = 2.6 * len(with_load) + 0.6
    fig, axes = plt.subplots(len(with_load), 1, figsize=(11, height_in), sharex=True,
                             sharey=True, layout="constrained", squeeze=False)  # fmt: skip
    fig.suptitle("In-flight requests per worker (frontend /metrics), one panel per run")
    highest = 1.0
    for ax, run in zip(axes[:, 0], with_load, strict=True):
        times, active, _ = worker_series(run["worker_load"])
        for i, w in enumerate(active):
            ax.step(times, active[w], where="post", label=f"worker {w}", **_worker_style(i))
            highest = max(highest, float(active[w].max(initial=0.0)))
        ax.set(ylabel="requests in flight", title=f"run {run['label']}")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylim(0, highest * 1.08)
    axes[-1, 0].set_xlabel("time since start (s)")
    _figure_legend(fig, list(axes[:, 0]))
    return to_png(fig)
