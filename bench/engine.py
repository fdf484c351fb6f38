"""Engine benchmark: Strata's engine against transformers ``generate``, same prompts, same run.

    python -m bench.engine [--device cpu|cuda] [--model DIR | --random-llama3-8b]
                           [--out bench/results/engine.json] [--repeats 3] [--threads N]

CPU (default): SmolLM2-135M-Instruct, float32 (``--model DIR``, else the checkpoint the tests
cache under ``.strata/test-cache``, converted from the bundled GGUF if missing): decode at batch
1 and 8, prefill of a 512-token prompt. ``--device cuda --random-llama3-8b``: a Llama-3-8B-shaped
model with random bfloat16 weights, built on the device and saved to a temporary directory there
(the engine loads checkpoints from disk): decode at batch 1 and 32, prefill of 2,048 tokens.

Prompts are seeded random token ids of varied lengths (``generate`` gets them left-padded with an
attention mask); both sides decode greedily with EOS ignored. Measures, each repeated after one
warm-up, reported as median (and best in the JSON):

* decode: Strata steps the engine until every request has its first token, then times the steps
  left; ``generate``'s decode step is ``(T(1 + steps new tokens) - T(1 new token)) / steps``.
* prefill: one request of N tokens generating one token (Strata: one engine step);
  ``generate`` with ``max_new_tokens=1``.
* on CUDA, the yardsticks in the same run: for decode, a plain static-cache decode step captured
  as one CUDA graph (``bench/static_decode.py``: no engine at all); for prefill, one plain
  forward of the prompt (logits of the last token only).

Prints a table with ratios (Strata tokens/s over ``generate``'s, and the yardstick's time over
Strata's: above 1 Strata is faster) and writes the JSON.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, machine_info, print_table, summarize, write_json
from serving.engine.core import EngineCore
from serving.engine.model_runner import ModelRunner
from serving.engine.request import Request, SamplingParams
from serving.engine.scheduler import SchedulerConfig

SMOLLM2_CACHE_DIR = Path(__file__).resolve().parents[1] / ".strata/test-cache/smollm2-135m-instruct"
_request_ids = itertools.count()


@dataclass(frozen=True)
class Workload:
    """What to measure: decode batch sizes, their prompt lengths, decode steps, prefill tokens."""

    decode_batches: tuple[int, ...]
    prompt_tokens: int  # decode prompts have lengths in [prompt_tokens / 2, prompt_tokens]
    decode_steps: int
    prefill_tokens: int
    num_blocks: int


CPU_WORKLOAD = Workload(
    (1, 8), prompt_tokens=64, decode_steps=32, prefill_tokens=512, num_blocks=256
)
CUDA_WORKLOAD = Workload(
    (1, 32), prompt_tokens=128, decode_steps=32, prefill_tokens=2048, num_blocks=1024
)

LLAMA3_8B_SHAPE: dict[str, Any] = {
    "vocab_size": 128_256,
    "hidden_size": 4096,
    "intermediate_size": 14_336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 128_000,
    "eos_token_id": 128_001,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500_000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}


# -- models --------------------------------------------------------------------------------


def smollm2_dir() -> Path:
    """The tests' cached SmolLM2 checkpoint, converted from the bundled GGUF if missing."""
    from workflows.model_import import bundled_smollm2_gguf, import_gguf

    if not (SMOLLM2_CACHE_DIR / "model.safetensors").is_file():
        import_gguf(bundled_smollm2_gguf(), SMOLLM2_CACHE_DIR, overwrite=True)
    return SMOLLM2_CACHE_DIR


def load_hf_model(model_dir: Path, device: str, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


@contextmanager
def random_llama3_8b(device: str, dtype: torch.dtype) -> Iterator[tuple[Path, Any]]:
    """A Llama-3-8B-shaped model with random weights built on ``device``, saved to a temp dir.

    Yields ``(checkpoint_dir, hf_model)``; the directory is removed afterwards.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA3_8B_SHAPE, dtype=dtype)
    start_s = time.perf_counter()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    built_s = time.perf_counter()
    work_dir = Path(tempfile.mkdtemp(prefix="strata-llama3-8b-"))
    try:
        model.save_pretrained(work_dir)
        print(
            f"random Llama-3-8B: built in {built_s - start_s:.1f} s, "
            f"saved in {time.perf_counter() - built_s:.1f} s to {work_dir}",
            flush=True,
        )
        yield work_dir, model
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def make_core(
    model_dir: Path, device: str, dtype: str, workload: Workload, *, enforce_eager: bool = False
) -> EngineCore:
    """An engine without a tokenizer (prompts are token ids): runner + scheduler + KV manager."""
    runner = ModelRunner(
        model_dir,
        device=device,
        dtype=dtype,
        num_blocks=workload.num_blocks,
        max_num_batched_tokens=max(2048, workload.prefill_tokens),
        max_num_seqs=max(workload.decode_batches),
        enforce_eager=enforce_eager,
    )
    config = SchedulerConfig(
        max_num_seqs=max(workload.decode_batches),
        max_num_batched_tokens=max(2048, workload.prefill_tokens),
        max_model_len=runner.arch.max_model_len,
    )
    return EngineCore(runner, config)


# -- measurements --------------------------------------------------------------------------


def make_prompts(batch: int, max_tokens: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Seeded random token ids, lengths spread over ``[max_tokens // 2, max_tokens]``."""
    rng = random.Random(seed)
    low_id, high_id = min(1000, vocab_size // 4), vocab_size - 1
    lengths = [rng.randint(max_tokens // 2, max_tokens) for _ in range(batch)]
    if batch == 1:
        lengths = [max_tokens]
    return [[rng.randint(low_id, high_id) for _ in range(n)] for n in lengths]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def strata_run(core: EngineCore, prompts: Sequence[list[int]], new_tokens: int) -> float:
    """Run the prompts to ``new_tokens`` outputs each; seconds per step after the first tokens.

    With ``new_tokens == 1`` returns the seconds of the whole run (the prefill).
    """
    assert core.reset_prefix_cache(), "blocks still in use: a previous run did not finish"
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    pending = set()
    for prompt in prompts:
        request_id = f"bench-{next(_request_ids)}"
        core.add_request(Request(request_id, list(prompt), params))
        pending.add(request_id)
    start_s = time.perf_counter()
    while pending:
        pending.difference_update(o.request_id for o in core.step().outputs)
    if new_tokens == 1:
        return time.perf_counter() - start_s
    start_s = time.perf_counter()
    num_steps = 0
    while core.has_unfinished_requests():
        core.step()
        num_steps += 1
    return (time.perf_counter() - start_s) / num_steps


def hf_generate_s(model: Any, prompts: Sequence[list[int]], new_tokens: int, device: str) -> float:
    """Seconds of one greedy ``generate`` call producing exactly ``new_tokens`` per prompt."""
    pad_id = 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sync(device)
    start_s = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad_id,
        )
    sync(device)
    elapsed_s = time.perf_counter() - start_s
    assert out.shape[1] == width + new_tokens
    return elapsed_s


def repeated(fn: Callable[[], float], repeats: int) -> list[float]:
    fn()  # warm-up
    return [fn() for _ in range(repeats)]


def hf_decode_step_s(model: Any, prompts: list[list[int]], steps: int, device: str) -> float:
    full_s = hf_generate_s(model, prompts, 1 + steps, device)
    first_s = hf_generate_s(model, prompts, 1, device)
    return (full_s - first_s) / steps


def hf_forward_s(model: Any, prompt: list[int], device: str) -> float:
    """Seconds of one plain forward of ``prompt`` (logits of the last position only)."""
    ids = torch.tensor([prompt], device=device)
    sync(device)
    start_s = time.perf_counter()
    with torch.no_grad():
        model(ids, logits_to_keep=1)
    sync(device)
    return time.perf_counter() - start_s


def measure(
    core: EngineCore, hf: Any, workload: Workload, device: str, repeats: int
) -> list[dict[str, Any]]:
    from bench.static_decode import static_graph_step_s

    vocab_size = core.executor.arch.vocab_size  # type: ignore[attr-defined]
    steps = workload.decode_steps
    on_cuda = device.startswith("cuda")
    results = []
    for batch in workload.decode_batches:
        prompts = make_prompts(batch, workload.prompt_tokens, vocab_size, seed=batch)
        strata = repeated(lambda p=prompts: strata_run(core, p, 1 + steps), repeats)
        hf_s = repeated(lambda p=prompts: hf_decode_step_s(hf, p, steps, device), repeats)
        results.append(_result("decode", batch, batch, strata, hf_s))
        if on_cuda:
            graph = static_graph_step_s(hf, prompts, steps, max(repeats, 5))
            _add_yardstick(results[-1], "static CUDA graph", graph)
        _progress(results[-1])
    prompt = make_prompts(1, workload.prefill_tokens, vocab_size, seed=0)
    strata = repeated(lambda: strata_run(core, prompt, 1), repeats)
    hf_s = repeated(lambda: hf_generate_s(hf, prompt, 1, device), repeats)
    results.append(_result("prefill", 1, workload.prefill_tokens, strata, hf_s))
    if on_cuda:
        forward = summarize(repeated(lambda: hf_forward_s(hf, prompt, device), repeats))
        _add_yardstick(results[-1], "plain forward", forward)
    _progress(results[-1])
    return results


def _add_yardstick(result: dict[str, Any], name: str, seconds: dict[str, Any]) -> None:
    """The yardstick's seconds per unit and its time over Strata's (above 1: Strata faster)."""
    result["yardstick"] = name
    result["yardstick_s"] = seconds
    result["yardstick_over_strata"] = seconds["median"] / result["strata_s"]["median"]


def _result(
    case: str, batch: int, tokens: int, strata_s: list[float], hf_s: list[float]
) -> dict[str, Any]:
    """``tokens`` are processed per timed unit (a decode step or the whole prefill)."""
    strata_median, hf_median = statistics.median(strata_s), statistics.median(hf_s)
    return {
        "case": case,
        "batch": batch,
        "tokens_per_unit": tokens,
        "strata_s": summarize(strata_s),
        "hf_generate_s": summarize(hf_s),
        "strata_tokens_per_s": tokens / strata_median,
        "hf_generate_tokens_per_s": tokens / hf_median,
        "strata_over_hf": hf_median / strata_median,
    }


def _progress(result: dict[str, Any]) -> None:
    yardstick = ""
    if "yardstick_s" in result:
        yardstick = f", {result['yardstick']} {result['yardstick_s']['median'] * 1e3:.2f} ms"
    print(
        f"{result['case']} batch {result['batch']}: "
        f"Strata {result['strata_s']['median'] * 1e3:.2f} ms, "
        f"generate {result['hf_generate_s']['median'] * 1e3:.2f} ms{yardstick}",
        flush=True,
    )


# -- entry point ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", type=Path, help="checkpoint dir (default: cached SmolLM2)")
    model.add_argument(
        "--random-llama3-8b",
        action="store_true",
        help="Llama-3-8B-shaped random bfloat16 weights built on the device",
    )
    parser.add_argument(
        "--dtype", help="float32, bfloat16, float16 (default: float32 on CPU, bfloat16 on CUDA)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after a warm-up")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default torch's)")
    parser.add_argument(
        "--enforce-eager", action="store_true", help="CUDA: no decode CUDA graphs in the engine"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "engine.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()  # before the run: its load average is the one that matters
    workload = CUDA_WORKLOAD if args.device.startswith("cuda") else CPU_WORKLOAD
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    if args.random_llama3_8b:
        with random_llama3_8b(args.device, dtype) as (model_dir, hf):
            core = make_core(
                model_dir, args.device, dtype_name, workload, enforce_eager=args.enforce_eager
            )
            model_name = "random Llama-3-8B shape"
            results = measure(core, hf, workload, args.device, args.repeats)
    else:
        model_dir = args.model or smollm2_dir()
        hf = load_hf_model(model_dir, args.device, dtype)
        core = make_core(
            model_dir, args.device, dtype_name, workload, enforce_eager=args.enforce_eager
        )
        model_name = model_dir.name
        results = measure(core, hf, workload, args.device, args.repeats)
    payload = {
        "benchmark": "engine",
        "model": model_name,
        "device": args.device,
        "dtype": dtype_name,
        "enforce_eager": args.enforce_eager,
        "machine": machine,
        # Other processes on a small CPU machine move these figures: compare with the start's.
        "load_average_1m_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "workload": asdict(workload),
        "results": results,
    }
    report(payload)
    print(f"wrote {write_json(args.out, payload)}")


def report(payload: dict[str, Any]) -> None:
    results = payload["results"]
    with_yardstick = any("yardstick_s" in r for r in results)
    rows = []
    for r in results:
        if r["case"] == "decode":
            label = f"decode, batch {r['batch']}"
        else:
            label = f"prefill, {r['tokens_per_unit']} tokens"
        row = [
            label,
            r["strata_s"]["median"] * 1e3,
            r["hf_generate_s"]["median"] * 1e3,
            r["strata_tokens_per_s"],
            r["hf_generate_tokens_per_s"],
            f"{r['strata_over_hf']:.2f}x",
        ]
        if with_yardstick:
            row += [
                f"{r['yardstick']} {r['yardstick_s']['median'] * 1e3:.2f}",
                f"{r['yardstick_over_strata']:.2f}x",
            ]
        rows.append(row)
    machine = payload["machine"]
    where = machine.get("gpu") if payload["device"].startswith("cuda") else machine["cpu"]
    headers = ["case", "Strata ms", "generate ms", "Strata tok/s", "generate tok/s", "Strata/HF"]
    if with_yardstick:
        headers += ["yardstick ms", "yardstick/Strata"]
    print_table(
        f"Strata engine vs transformers generate: {payload['model']}, {payload['dtype']}, "
        f"{where}; median of {results[0]['strata_s']['repeats']} repeats",
        headers,
        rows,
    )


if __name__ == "__main__":
    main()
