"""Helpers shared by the bench tests."""

from __future__ import annotations

import json
from pathlib import Path


def tiny_trace(path: Path) -> Path:
    """Ten minutes of trace time (Mooncake JSONL): one 400-token prompt with 40 output tokens
    every second."""
    rows = [
        {"timestamp": i * 1000, "input_length": 400, "output_length": 40, "hash_ids": [i]}
        for i in range(600)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
