"""HTML reports for ``strata bench serve``: one run, or several compared.

Each figure is written as ``DIR/<name>.png`` and embedded in ``DIR/report.html`` as a data URI
(the HTML stands alone; each image links to its file). Reads only ``run.json`` dicts.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import print_table
from bench.serve_plots import (
    itl_ms,
    plot_cdfs,
    plot_distribution,
    plot_throughput,
    plot_throughput_compare,
    plot_worker_load,
    plot_worker_load_compare,
    ttft_ms,
)

REPORT_FILE = "report.html"
COMPARE_FILE = "compare.json"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
figure { margin: 1.5em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""

SUMMARY_COLUMNS = (
    "run", "requests ok / sent", "TTFT p50 / p90 / p99 (ms)", "ITL p50 / p90 / p99 (ms)",
    "output tok/s", "req/s", "prefix hit rate", "duration (s)", "routed per worker",
)  # fmt: skip


def summary_row(run: dict[str, Any]) -> list[str]:
    """One table row of a run's summary, formatted."""
    s = run["summary"]

    def ms(key: str) -> str:
        return " / ".join(f"{s[key][f'p{q}'] * 1000:,.1f}" for q in (50, 90, 99))

    routed = s.get("routed_per_worker")
    per_worker = " / ".join(f"{w}: {n:.0f}" for w, n in routed.items()) if routed else "-"
    return [
        run["label"],
        f"{s['requests']['completed']} / {s['requests']['total']}",
        ms("ttft_s"),
        ms("itl_s"),
        f"{s['throughput_tok_s']:,.0f}",
        f"{s.get('requests_per_s', 0.0):.2f}",
        f"{s['hit_rate']:.1%}",
        f"{s['makespan_s']:.1f}",
        per_worker,
    ]


def print_summaries(title: str, runs: Sequence[dict[str, Any]]) -> None:
    """The summary table on stdout."""
    print_table(title, SUMMARY_COLUMNS, [summary_row(r) for r in runs])


def _table(rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in SUMMARY_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(out: Path, name: str, png: bytes, caption: str) -> str:
    """Write ``out/name`` and return its ``<figure>``: the image inline, linked to the file."""
    (out / name).write_bytes(png)
    data = base64.b64encode(png).decode()
    return (
        f'<figure><a href="{name}"><img src="data:image/png;base64,{data}" alt="{name}"></a>'
        f'<figcaption>{html.escape(caption)} (<a href="{name}">{name}</a>)</figcaption>'
        "</figure>"
    )


def _page(title: str, sections: Sequence[str]) -> str:
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}'
        f"</title><style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def _describe_load(run: dict[str, Any]) -> str:
    c = run["config"]
    if c.get("synthetic"):
        return (f"synthetic, closed loop: {c['concurrency']} concurrent clients, "
                f"{c['num_requests']} requests of {c['prompt_tokens']} prompt tokens "
                f"and {c['output_tokens']} output tokens")  # fmt: skip
    limit = f", first {c['limit']} requests" if c.get("limit") else ""
    return f"trace {Path(c['trace']).name}{limit}, arrivals divided by {c['speedup']} (open loop)"


def _router(run: dict[str, Any]) -> str:
    load = run.get("worker_load")
    return ", ".join(load.get("policies") or ["unknown"]) if load else "not a Strata frontend"


def write_report(run: dict[str, Any], out: Path) -> Path:
    """``out/report.html`` and its PNGs for one run; returns the HTML's path."""
    out.mkdir(parents=True, exist_ok=True)
    label = run["label"]
    s = run["summary"]
    workers = run["endpoint"].get("workers_before")
    meta = {
        "endpoint": run["config"]["url"],
        "model": run["endpoint"]["model"],
        "load": _describe_load(run),
        "router policy": _router(run),
        "started": run["started_at"],
        "workers": ", ".join(f"{w['worker_id']} ({w['url']})" for w in workers) if workers
        else "not a Strata frontend (no /admin/workers)",
    }  # fmt: skip
    sections = [
        "<ul>" + "".join(f"<li><b>{k}</b>: {html.escape(str(v))}</li>" for k, v in meta.items())
        + "</ul>",
        "<h2>Summary</h2>" + _table([summary_row(run)]),
    ]  # fmt: skip
    if s["errors"]:
        sections.append("<p>Errors (first five kinds):</p><pre>"
                        + html.escape("\n".join(s["errors"])) + "</pre>")  # fmt: skip
    figures: list[tuple[str, Callable[[], bytes], str]] = [
        ("ttft.png", lambda: plot_distribution(ttft_ms(run), "TTFT", label),
         "Time to first token per request, from sending the request to the first token chunk."),
        ("itl.png", lambda: plot_distribution(itl_ms(run), "ITL", label),
         "Inter-token latency: gaps between consecutive output tokens of each request."),
        ("throughput.png", lambda: plot_throughput(run),
         "Output tokens per second across all requests, per 1 s bucket, and requests in flight."),
    ]  # fmt: skip
    if run.get("worker_load"):
        figures.append(("worker_load.png", lambda: plot_worker_load(run["worker_load"], label),
                        "Per-worker load from the frontend's router series."))  # fmt: skip
    sections.append("<h2>Plots</h2>")
    sections += [_figure(out, name, draw(), caption) for name, draw, caption in figures]
    if not run.get("worker_load"):
        sections.append("<p>No per-worker load: the endpoint exposes no "
                        "<code>strata_router_*</code> series on /metrics.</p>")  # fmt: skip
    config = json.dumps(run["config"], indent=2)
    sections.append(f"<h2>Configuration</h2><pre>{html.escape(config)}</pre>")
    path = out / REPORT_FILE
    path.write_text(_page(f"strata bench serve: {label}", sections))
    return path


def write_compare_report(runs: Sequence[dict[str, Any]], out: Path) -> Path:
    """``out/report.html``, its PNGs and ``compare.json`` (the summaries) for several runs."""
    if len(runs) < 2:
        raise ValueError("compare needs at least two runs")
    labels = [r["label"] for r in runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"runs need distinct labels (--label), got {labels}")
    out.mkdir(parents=True, exist_ok=True)
    loads = "".join(
        f"<li><b>{html.escape(r['label'])}</b>: {html.escape(_describe_load(r))}, "
        f"router policy {html.escape(_router(r))}, {html.escape(r['config']['url'])}, "
        f"started {r['started_at']}</li>"
        for r in runs
    )
    sections = [f"<ul>{loads}</ul>", "<h2>Summary</h2>" + _table([summary_row(r) for r in runs])]
    figures: list[tuple[str, Callable[[], bytes], str]] = [
        ("ttft_cdf.png", lambda: plot_cdfs(runs, "TTFT"), "TTFT CDF per run."),
        ("itl_cdf.png", lambda: plot_cdfs(runs, "ITL"), "ITL CDF per run."),
        ("throughput.png", lambda: plot_throughput_compare(runs),
         "Output tokens per second per 1 s bucket, per run."),
    ]  # fmt: skip
    if any(r.get("worker_load") for r in runs):
        figures.append(("worker_load.png", lambda: plot_worker_load_compare(runs),
                        "Per-worker in-flight requests, one panel per run."))  # fmt: skip
    sections.append("<h2>Plots</h2>")
    sections += [_figure(out, name, draw(), caption) for name, draw, caption in figures]
    summaries = {r["label"]: {"config": r["config"], "summary": r["summary"]} for r in runs}
    (out / COMPARE_FILE).write_text(json.dumps(summaries, indent=2) + "\n")
    path = out / REPORT_FILE
    path.write_text(_page("strata bench serve: " + " vs ".join(labels), sections))
    return path
