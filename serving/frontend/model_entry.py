"""One served model of ``strata serve`` and its ``--model DIR;name=..;engine=..`` syntax (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True)
class ModelEntry:
    """One served model and its local workers (``--model DIR;name=..;engine=..;workers=..``)."""

    model_dir: Path
    name: str
    engine: str = "builtin"
    num_workers: int = 1
    num_prefill: int = 0
    num_decode: int = 0

    @property
    def roles(self) -> list[str]:
        """One role per local worker, in start order."""
        return (
            ["both"] * self.num_workers
            + ["prefill"] * self.num_prefill
            + ["decode"] * self.num_decode
        )


ENGINES = ("builtin", "mock", "vllm")
_ENTRY_OPTIONS = ("name", "engine", "workers", "prefill", "decode")


def parse_model_entry(text: str, default: ModelEntry) -> ModelEntry:
    """``DIR[;name=NAME][;engine=E][;workers=N][;prefill=P][;decode=D]`` (a ``--model`` value);
    unset options come from ``default``. Raises ``ValueError`` naming the bad part."""
    path, *options = [part.strip() for part in text.split(";")]
    values: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in _ENTRY_OPTIONS or not value:
            raise ValueError(
                f"--model {text!r}: option {option!r}, expected "
                + ", ".join(f"{k}=..." for k in _ENTRY_OPTIONS)
            )
        values[key] = value
    model_dir = Path(path).absolute()
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"--model {path}: no config.json there")
    counts = {}
    for key, fallback in (("workers", default.num_workers), ("prefill", default.num_prefill),
                          ("decode", default.num_decode)):  # fmt: skip
        try:
            counts[key] = int(values.get(key, fallback))
        except ValueError:
            raise ValueError(f"--model {text!r}: {key} must be an integer") from None
        if counts[key] < 0:
            raise ValueError(f"--model {text!r}: {key} must be >= 0")
    if ("prefill" in values or "decode" in values) and "workers" not in values:
        counts["workers"] = 0
    engine = values.get("engine", default.engine)
    if engine not in ENGINES:
        raise ValueError(f"--model {text!r}: engine must be one of {', '.join(ENGINES)}")
    return ModelEntry(model_dir, values.get("name", default.name or model_dir.name), engine,
                      counts["workers"], counts["prefill"], counts["decode"])  # fmt: skip
