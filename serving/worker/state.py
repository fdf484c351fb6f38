"""What the worker's HTTP handlers share: the engine, the model's facts, the tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serving.engine.factory import ModelInfo
from serving.worker.engine_loop import AsyncEngine


@dataclass(slots=True)
class WorkerState:
    """One worker process's serving state; ``draining`` and ``extra_health`` feed /health."""

    engine: AsyncEngine
    info: ModelInfo
    tokenizer: Any | None
    served_model_names: list[str]
    draining: bool = False
    extra_health: dict[str, Any] = field(default_factory=dict)
