"""Small helpers shared by the benchmarks: timing summaries, the machine, a table, a JSON file.

Benchmarks print one ``rich`` table and write their figures to ``bench/results/`` (git-ignored).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linearly interpolated (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Best (minimum), median and worst of repeated timings, plus their count."""
    return {
        "best": min(values),
        "median": statistics.median(values),
        "worst": max(values),
        "repeats": len(values),
    }


def repeat_timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``fn()`` for each of ``repeats`` runs after ``warmup`` untimed ones.

    ``fn`` must itself wait for any asynchronous device work it starts.
    """
    for _ in range(warmup):
        fn()
    times_s = []
    for _ in range(repeats):
        start_s = time.perf_counter()
        fn()
        times_s.append(time.perf_counter() - start_s)
    return times_s


def cpu_name() -> str:
    """The processor's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: CPU, core count, load average at the start, Python, torch, GPU."""
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "num_cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_num_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """One table on stdout; floats with three significant digits, text and ints as given."""
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(_cell(value) for value in row))
    Console(width=max(100, Console().width)).print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (indented JSON) to ``path``, creating its folder; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path
