"""Listing output: piped tables never wrap, terminal tables never break a word, JSON is raw."""

from __future__ import annotations

import io
import json

from rich.console import Console

from workflows.listing import Column, OutputFormat, emit, plain_table

COLUMNS = (
    Column("name", "name"),
    Column("aliases", "aliases"),
    Column("source", "source", shrink=True),
    Column("created", "created (UTC)"),
)
ROWS = [
    {"name": "smollm2-135m-instruct", "aliases": ["candidate", "production"],
     "source": "s3://strata-models/a-very-long-prefix/that-goes-on-and-on/smollm2-135m-instruct/",
     "created": "2026-12-04T17:00Z"},
    {"name": "m", "aliases": [], "source": None, "created": "2026-12-04T17:01Z"},
]  # fmt: skip


def test_piped_table_has_one_line_per_row_and_one_word_per_cell() -> None:
    out = io.StringIO()  # not a terminal
    emit(ROWS, COLUMNS, file=out)
    assert out.getvalue() == plain_table(ROWS, COLUMNS)
    header, first, second = out.getvalue().splitlines()
    assert header.split() == ["NAME", "ALIASES", "SOURCE", "CREATED_(UTC)"]
    assert first.split() == [
        "smollm2-135m-instruct", "candidate,production", ROWS[0]["source"], "2026-12-04T17:00Z",
    ]  # fmt: skip
    assert second.split() == ["m", "-", "-", "2026-12-04T17:01Z"]
    assert len(first) > 80  # wider than the terminal would be, and still one line


def test_terminal_table_in_80_columns_cuts_the_source_and_breaks_no_word() -> None:
    out = io.StringIO()
    emit(ROWS, COLUMNS, console=Console(file=out, width=80, force_terminal=False))
    lines = out.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    body = [line for line in lines if "smollm2-135m-instruct" in line or "│ m " in line]
    assert len(body) == 2  # each row on one line: nothing wrapped onto a second
    for word in ("smollm2-135m-instruct", "candidate,production", "2026-12-04T17:00Z"):
        assert word in body[0]
    assert "…" in body[0] and ROWS[0]["source"] not in body[0]


def test_json_output_keeps_raw_values() -> None:
    out = io.StringIO()
    emit(ROWS, COLUMNS, output=OutputFormat.json, file=out)
    assert json.loads(out.getvalue()) == ROWS
