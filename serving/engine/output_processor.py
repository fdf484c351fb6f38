"""Token ids -> text deltas, with stop strings. Runs beside the engine; no HTTP here.

Detokenization is incremental (``tokenizers``' ``DecodeStream``, seeded with the prompt's last
tokens so word boundaries and multi-byte characters come out as a full decode would give them).
Stop strings are matched on text; while a suffix of the text could still grow into a stop
string, that suffix is held back from the stream, so a client never sees part of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from serving.engine.outputs import EngineCoreOutput, RequestTimes
from serving.engine.scheduler_output import TokenLogprobs

# Prompt tokens used to seed each request's decode stream.
_PROMPT_CONTEXT_TOKENS = 6


@dataclass(slots=True)
class RequestOutput:
    """What the API layer gets for one request after one step: deltas, and usage at the end."""

    request_id: str
    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    times: RequestTimes | None = None
    kv_transfer_params: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class IncrementalDetokenizer:
    """Text of one request's output, token by token, with stop-string handling."""

    def __init__(
        self,
        tokenizer: Tokenizer | None,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop_str_in_output
        self.text = ""  # all text so far (cut at a stop string once one matched)
        self._num_sent_chars = 0
        self._holdback_chars = max((len(s) for s in self.stop), default=1) - 1
        self.stream: DecodeStream | None = None
        if tokenizer is not None:
            context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
            self.stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)

    def add_tokens(self, token_ids: Sequence[int], finished: bool) -> tuple[str, str | None]:
        """Append tokens; returns (text delta to send now, stop string matched or None)."""
        if self.stream is None:
            return "", None
        start = max(len(self.text) - self._holdback_chars - 1, 0)
        for token_id in token_ids:
            piece = self.stream.step(self.tokenizer, token_id)
            if piece:
                self.text += piece
        matched = self._find_stop(start)
        if matched is not None or finished:
            delta = self.text[self._num_sent_chars :]
            self._num_sent_chars = len(self.text)
            return delta, matched
        safe_end = max(len(self.text) - self._holdback_chars, self._num_sent_chars)
        delta = self.text[self._num_sent_chars : safe_end]
        self._num_sent_chars = safe_end
        return delta, None

    def _find_stop(self, start: int) -> str | None:
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = self.text.find(stop, start)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        self.text = self.text[: index + len(stop) if self.include_stop else index]
        return stop


class OutputProcessor:
    """Per-request detokenizers; turns engine outputs into ``RequestOutput`` deltas."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._detok: dict[str, IncrementalDetokenizer] = {}

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._detok[request_id] = IncrementalDetokenizer(
            self.tokenizer,
            prompt_token_ids,
            skip_special_tokens=skip_special_tokens,
            stop=stop,
            include_stop_str_in_output=include_stop_str_in_output,
        )

    def remove_request(self, request_id: str) -> None:
        self._detok.pop(request_id, None)

    def process(self, outputs: Sequence[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the deltas, and ids that matched a stop string (the engine must stop them)."""
        results: list[RequestOutput] = []
        stopped: list[str] = []
        for out in outputs:
            detok = self._detok.get(out.request_id)
            if detok is None:
                continue  # already finished by a stop string
            text, stop_str = detok.add_tokens(out.new_token_ids, out.finished)
            finish_reason, stop_reason = out.finish_reason, out.stop_reason
            if stop_str is not None and finish_reason is None:
                finish_reason, stop_reason = "stop", stop_str
                stopped.append(out.request_id)
            elif stop_str is not None:
                finish_reason, stop_reason = "stop", stop_str
            results.append(
                RequestOutput(
                    request_id=out.request_id,
                    text=text,
                    token_ids=list(out.new_token_ids),
                    num_prompt_tokens=out.num_prompt_tokens,
                    num_cached_tokens=out.num_cached_tokens,
                    num_output_tokens=out.num_output_tokens,
                    logprobs=list(out.new_logprobs),
                    finish_reason=finish_reason,
                    stop_reason=stop_reason,
                    times=out.times,
                    kv_transfer_params=out.kv_transfer_params,
                )
            )
            if finish_reason is not None:
                del self._detok[out.request_id]
        return results, stopped
