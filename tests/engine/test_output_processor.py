"""Incremental detokenization and stop strings against the real SmolLM2 tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from serving.engine.output_processor import IncrementalDetokenizer, OutputProcessor
from serving.engine.outputs import EngineCoreOutput


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


TEXTS = [
    "The capital of France is Paris.",
    "Le café coûte 3,50 € à Paris — déjà cher!",
    "北京是中国的首都。東京は日本の首都です。",
    "def f(x):\n    return x ** 2  # 🚀 emoji",
]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode(tokenizer: Tokenizer, text: str) -> None:
    prompt = tokenizer.encode("Answer:").ids
    ids = tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add_tokens([t], finished=i == len(ids) - 1)[0] for i, t in enumerate(ids)]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in d for d in deltas)  # no half characters


def test_stop_string_spanning_tokens_is_never_streamed(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("one two three four five").ids
    detok = IncrementalDetokenizer(tokenizer, [], stop=["three four"])
    sent, matched = "", None
    for token in ids:
        delta, matched = detok.add_tokens([token], finished=False)
        sent += delta
        assert "three" not in sent  # held back until it is known not to be a stop string
        if matched:
            break
    assert matched == "three four"
    assert sent == "one two "


def test_include_stop_str_in_output(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("alpha beta gamma").ids
    detok = IncrementalDetokenizer(tokenizer, [], stop=["beta"], include_stop_str_in_output=True)
    text = ""
    for token in ids:
        delta, matched = detok.add_tokens([token], finished=False)
        text += delta
        if matched:
            break
    assert text == "alpha beta"


def test_processor_reports_stop_string_requests_to_abort(tokenizer: Tokenizer) -> None:
    processor = OutputProcessor(tokenizer)
    processor.add_request("a", [1], stop=["Paris"])
    processor.add_request("b", [1])
    ids = tokenizer.encode(" in Paris today").ids
    stopped_all: list[str] = []
    finish: dict[str, str | None] = {}
    for token in ids:
        outs = [
            EngineCoreOutput(
                request_id=r, new_token_ids=[token], num_prompt_tokens=1, num_cached_tokens=0
            )
            for r in ("a", "b")
        ]
        results, stopped = processor.process(outs)
        stopped_all += stopped
        for r in results:
            finish[r.request_id] = r.finish_reason
    assert stopped_all == ["a"]
    assert finish == {"a": "stop", "b": None}
