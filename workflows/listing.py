"""Output of the listing commands (``strata models``, ``strata local status``): one table for a
person, plain columns for a pipe, JSON for a program.

    --output table, stdout a terminal   a rich table; cells never wrap, a long one is cut short
                                        with an ellipsis ("…") to fit the terminal
    --output table, stdout not one      kubectl-style columns: an upper-case one-word header,
                                        cells padded with spaces, one line per row whatever the
                                        width (COLUMNS=80 included), nothing cut
    --output json                       a JSON array of objects with the raw values

Cells are strings; ``None`` shows as "-" and a list as its items joined by ",".
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table


class OutputFormat(StrEnum):
    table = "table"
    json = "json"


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    header: str  # shown as is in a terminal, upper-cased with "_" for spaces in a pipe
    shrink: bool = False  # the column a narrow terminal shortens first (URIs, notes)
    style: str = ""


def cell(value: Any) -> str:
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def emit(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[Column],
    *,
    output: OutputFormat = OutputFormat.table,
    title: str = "",
    console: Console | None = None,
    file: TextIO | None = None,
) -> None:
    """Print ``rows`` (dicts with each column's key) to ``file`` (default stdout)."""
    out = file or sys.stdout
    if output == OutputFormat.json:
        out.write(json.dumps(list(rows), indent=2, sort_keys=True, default=str) + "\n")
        return
    if console is None and not out.isatty():
        out.write(plain_table(rows, columns))
        return
    console = console or Console(file=out)
    cells = [[cell(row.get(c.key)) for c in columns] for row in rows]
    widest = [max([len(c.header), *(len(ln[i]) for ln in cells)]) for i, c in enumerate(columns)]
    # Only the shrinkable columns give up width (shared equally); the others keep their widest
    # cell. Each column costs 3 characters of border and padding, plus 1 for the table's edge.
    fixed = sum(w for w, c in zip(widest, columns, strict=True) if not c.shrink)
    num_shrink = sum(c.shrink for c in columns) or 1
    room = max((console.width - fixed - 3 * len(columns) - 1) // num_shrink, 6)
    table = Table(title=title or None)
    for column, width in zip(columns, widest, strict=True):
        table.add_column(
            column.header,
            no_wrap=True,
            overflow="ellipsis",
            min_width=min(width, room) if column.shrink else width,
            max_width=min(width, room) if column.shrink else None,
            style=column.style or None,
        )
    for line in cells:
        table.add_row(*(escape(value) for value in line))
    console.print(table)


def plain_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Space-aligned columns, one line per row; the last column is not padded."""
    headers = [c.header.upper().replace(" ", "_") for c in columns]
    lines = [headers] + [[cell(row.get(c.key)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    text = []
    for line in lines:
        padded = [value.ljust(width) for value, width in zip(line[:-1], widths, strict=False)]
        text.append("   ".join([*padded, line[-1]]).rstrip())
    return "\n".join(text) + "\n"
