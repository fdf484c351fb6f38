"""``bench/disagg_gpu.py`` end to end on the CPU with a 2-layer model (``--tiny``): both layouts
serve every request, the disaggregated one prefills remotely and pulls KV."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import disagg_gpu

pytestmark = pytest.mark.slow


def test_tiny_run_compares_both_layouts(tmp_path: Path) -> None:
    out = tmp_path / "disagg-gpu.json"
    disagg_gpu.main(
        ["--tiny", "--devices", "cpu,cpu", "--dtype", "float32", "--duration", "3",
         "--chat-rate", "3", "--long-rate", "1", "--long-tokens", "1024",
         "--max-model-len", "4096", "--num-blocks", "1024", "--drain", "60",
         "--log-dir", str(tmp_path / "logs"), "--out", str(out)]
    )  # fmt: skip
    layouts = json.loads(out.read_text())["layouts"]
    assert set(layouts) == {"agg2", "p1d1"}
    for report in layouts.values():
        assert report["requests"]["completed"] == report["requests"]["total"] > 0
    agg, pd = layouts["agg2"], layouts["p1d1"]
    assert agg["decisions"]["aggregated"] == agg["requests"]["total"]
    assert pd["decisions"]["remote"] >= 1  # at least the fresh long documents
    assert pd["kv_pulled_bytes"] > 0 and pd["kv_pull_gb_s"] > 0
    assert set(pd["transports"].values()) <= {"nixl", "tcp"}
