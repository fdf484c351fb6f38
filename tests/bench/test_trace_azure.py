"""Azure LLM inference traces (``TIMESTAMP,ContextTokens,GeneratedTokens`` CSV), day study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.trace import load_azure, load_trace, write_mooncake
from workflows.bench_cli import app as bench_app

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def _csv(path: Path, rows: list[str]) -> Path:
    path.write_text(HEADER + "".join(row + "\n" for row in rows))
    return path


def test_azure_rows_become_requests_with_arrivals_from_the_first_row(tmp_path: Path) -> None:
    path = _csv(tmp_path / "conv.csv", [
        "2023-11-16 18:15:46.6805900,374,44",
        "2023-11-16 18:15:50.9951690,1025,109",
        "2023-11-16 18:16:46.6805900,512,1",
    ])  # fmt: skip
    requests = load_trace(path)
    assert [r.index for r in requests] == [0, 1, 2]
    assert [r.arrival_s for r in requests] == pytest.approx([0.0, 4.314579, 60.0])
    assert [(r.input_length, r.output_length) for r in requests] == [(374, 44), (1025, 109),
                                                                      (512, 1)]  # fmt: skip
    assert [r.hash_ids for r in requests] == [(0,), (1, 2, 3), (4,)]  # no shared prefix
    assert load_azure(path, limit=2) == requests[:2]
    write_mooncake(tmp_path / "conv.jsonl", requests)  # the same requests as Mooncake JSONL
    assert [(r.input_length, r.hash_ids) for r in load_trace(tmp_path / "conv.jsonl")] == [
        (r.input_length, r.hash_ids) for r in requests
    ]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["2023-11-16 18:15:46,374"], "conv.csv:2"),
        (["yesterday,374,44"], "conv.csv:2"),
        (["2023-11-16 18:15:46,374,0"], "lengths must be >= 1"),
        (["2023-11-16 18:15:46,374,4", "2023-11-16 18:15:45,374,4"], "conv.csv:3: timestamp"),
    ],
)
def test_bad_azure_rows_are_named(tmp_path: Path, rows: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_azure(_csv(tmp_path / "conv.csv", rows))


def test_a_csv_without_azure_columns_is_named(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("time,prompt,output\n1,2,3\n")
    with pytest.raises(ValueError, match=r"other\.csv: not an Azure LLM trace: no column TIME"):
        load_trace(path)


def test_day_study_takes_an_azure_trace(tmp_path: Path) -> None:
    rows = [f"2023-11-16 18:{m:02d}:{s:02d}.5000000,300,30" for m in range(10) for s in range(60)]
    trace, out = _csv(tmp_path / "conv.csv", rows), tmp_path / "study.json"
    result = CliRunner().invoke(bench_app, [
        "replay", "--trace", str(trace), "--planner", "static", "--speedup", "8",
        "--duration-s", "1200", "--arrival-jitter-s", "0", "--max-num-seqs", "4", "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    static = json.loads(out.read_text())["results"][0]
    assert static["requests"] > 0 and static["rejected"] == 0
