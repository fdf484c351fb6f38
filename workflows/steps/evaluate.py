"""evaluate: ask the candidate a fixed question set (shipped with the project), score answers.

An answer is correct when it contains one of the expected strings (case-insensitive). Questions
are sent one at a time with greedy decoding, so a rerun scores the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

EVALSETS_DIR = Path(__file__).resolve().parents[1] / "evalsets"


class EvalSetError(ValueError):
    """The eval set is missing or malformed: every attempt fails the same way."""

    retryable = False


@dataclass(frozen=True, slots=True)
class EvalItem:
    question: str
    expected: tuple[str, ...]


@dataclass(slots=True)
class EvalReport:
    accuracy: float
    num_questions: int
    failures: list[dict[str, Any]] = field(default_factory=list)


def load_eval_set(name_or_path: str) -> list[EvalItem]:
    path = Path(name_or_path)
    if not path.is_file():
        path = EVALSETS_DIR / f"{name_or_path}.jsonl"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in EVALSETS_DIR.glob("*.jsonl")))
        raise EvalSetError(f"eval set {name_or_path!r} not found (shipped: {known})")
    items = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            items.append(EvalItem(doc["question"], tuple(doc["expected"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise EvalSetError(f"{path}:{line_no}: bad eval item: {exc}") from exc
    if not items:
        raise EvalSetError(f"{path}: no questions")
    return items


def is_correct(answer: str, expected: tuple[str, ...]) -> bool:
    lowered = answer.lower()
    return any(e.lower() in lowered for e in expected)


def run_evaluation(
    endpoint: str, model: str, eval_set: str = "default", *, max_tokens: int = 48
) -> EvalReport:
    items = load_eval_set(eval_set)
    client = openai.OpenAI(base_url=f"{endpoint.rstrip('/')}/v1", api_key="unused", timeout=300)
    failures = []
    for item in items:
        response = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": item.question}],
            temperature=0,
            max_tokens=max_tokens,
        )
        answer = response.choices[0].message.content or ""
        if not is_correct(answer, item.expected):
            failures.append({"question": item.question, "expected": list(item.expected),
                             "answer": answer})  # fmt: skip
    correct = len(items) - len(failures)
    return EvalReport(correct / len(items), len(items), failures)
