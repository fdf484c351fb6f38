"""The engine at two revisions, interleaved step by step: is the new one slower on this machine?

    python -m bench.engine_ab --before REV [--after DIR] [--model DIR] [--rounds 6]
                              [--threads 1] [--out bench/results/engine_ab.json]

``--before`` is a git revision (checked out with ``git worktree add --detach`` into a temporary
directory, removed afterwards) or a directory holding a checkout; ``--after`` defaults to this
checkout. Each side runs in its own process, importing its own tree's ``serving`` and
``bench.engine`` (the CPU workload of ``bench/engine.py``: SmolLM2 float32, decode at batch 1
and 8 over 32 steps, prefill of 512 tokens), with the same model, threads and prompts. The
parent sends one measurement at a time to one side, then the same to the other (the order
alternates each round), so a busy neighbour on a shared machine slows both sides of a pair
alike: the result is the median of the paired ratios ``before / after`` (above 1: after is
faster), beside the medians of each side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, machine_info, print_table, summarize, write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
CASES = (("decode", 1), ("decode", 8), ("prefill", 1))
PREFIX = "AB "
Times = dict[tuple[str, int], dict[str, list]]

# Runs in each side's process, with that side's tree first on sys.path.
CHILD = """
import json, sys
from pathlib import Path
tree, model, threads = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, tree)
import torch
torch.set_num_threads(threads)
import serving
from bench import engine as be
if not Path(serving.__file__).resolve().is_relative_to(Path(tree).resolve()):
    raise SystemExit(f"serving imported from {serving.__file__}, not from {tree}")
wl = be.CPU_WORKLOAD
core = be.make_core(model, "cpu", "float32", wl)
vocab = core.executor.arch.vocab_size
print("AB " + json.dumps({"ready": serving.__file__}), flush=True)
for line in sys.stdin:
    case, batch = json.loads(line)
    if case == "decode":
        prompts = be.make_prompts(batch, wl.prompt_tokens, vocab, seed=batch)
        seconds = be.strata_run(core, prompts, 1 + wl.decode_steps)
    else:
        seconds = be.strata_run(core, be.make_prompts(1, wl.prefill_tokens, vocab, seed=0), 1)
    print("AB " + json.dumps({"s": seconds}), flush=True)
"""


class Side:
    """One tree's engine in a child process, measured on request."""

    def __init__(self, name: str, tree: Path, model: Path, threads: int) -> None:
        self.name, self.tree = name, tree
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(tree)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tree), str(model), str(threads)],
            cwd=tree,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX) :])
        raise RuntimeError(f"{self.name} ({self.tree}) exited with {self.proc.wait()}")

    def ready(self) -> str:
        return self._reply()["ready"]

    def measure(self, case: str, batch: int) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([case, batch]) + "\n")
        self.proc.stdin.flush()
        return self._reply()["s"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def checkout(spec: str) -> Iterator[Path]:
    """A directory as is, or a git revision in a temporary worktree (removed afterwards)."""
    if Path(spec).is_dir():
        yield Path(spec).resolve()
        return
    tree = Path(tempfile.mkdtemp(prefix="strata-ab-")) / "tree"
    git = ["git", "-C", str(REPO_ROOT), "worktree"]
    subprocess.run([*git, "add", "--detach", str(tree), spec], check=True, capture_output=True)
    try:
        yield tree
    finally:
        subprocess.run([*git, "remove", "--force", str(tree)], check=False, capture_output=True)
        tree.parent.rmdir()


def interleave(
    sides: Sequence[Side], rounds: int, on_round: Callable[[Times, int], None] | None = None
) -> Times:
    """Per case: each side's seconds per round and the load average before each pair.

    ``on_round(times, rounds_done)`` runs after each round (the JSON is rewritten then, so a
    run stopped on a busy machine keeps the rounds it finished)."""
    times: Times = {case: {"load_1m": [], **{s.name: [] for s in sides}} for case in CASES}
    for case in CASES:  # warm-up, not recorded
        for side in sides:
            side.measure(*case)
    for round_index in range(rounds):
        order = sides if round_index % 2 == 0 else list(reversed(sides))
        for case in CASES:
            times[case]["load_1m"].append(os.getloadavg()[0])
            for side in order:
                times[case][side.name].append(side.measure(*case))
        print(f"round {round_index + 1}/{rounds} done, load {os.getloadavg()[0]:.1f}", flush=True)
        if on_round is not None:
            on_round(times, round_index + 1)
    return times


def summarise(times: Times) -> list[dict[str, Any]]:
    results = []
    for (case, batch), t in times.items():
        ratios = [b / a for b, a in zip(t["before"], t["after"], strict=True)]
        results.append(
            {
                "case": case,
                "batch": batch,
                "before_s": summarize(t["before"]),
                "after_s": summarize(t["after"]),
                "before_over_after": summarize(ratios),
                "raw": t,
            }
        )
    return results


def report(results: list[dict[str, Any]], rounds: int, threads: int) -> None:
    rows = []
    for r in results:
        label = f"decode step, batch {r['batch']}" if r["case"] == "decode" else "prefill, 512"
        ratio = r["before_over_after"]
        rows.append(
            [
                label,
                r["before_s"]["median"] * 1e3,
                r["after_s"]["median"] * 1e3,
                f"{ratio['median']:.3f}x",
                f"{ratio['best']:.2f}-{ratio['worst']:.2f}",
            ]
        )
    print_table(
        f"Engine before vs after, interleaved; {rounds} rounds, {threads} thread(s)",
        ["case", "before ms", "after ms", "before/after (median pair)", "pair range"],
        rows,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision or checkout directory")
    parser.add_argument("--after", default=str(REPO_ROOT), help="default: this checkout")
    parser.add_argument("--model", type=Path, help="checkpoint dir (default: cached SmolLM2)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "engine_ab.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from bench.engine import smollm2_dir

    model = (args.model or smollm2_dir()).resolve()
    machine = machine_info()
    imported: dict[str, str] = {}

    def payload(results: list[dict[str, Any]], rounds_done: int) -> dict[str, Any]:
        return {
            "benchmark": "engine_ab",
            "before": args.before,
            "after": args.after,
            "imported": imported,
            "model": str(model),
            "threads": args.threads,
            "rounds": rounds_done,
            "machine": machine,
            "results": results,
        }

    def checkpoint(times: Times, rounds_done: int) -> None:
        write_json(args.out, payload(summarise(times), rounds_done))

    with checkout(args.before) as before_tree, checkout(args.after) as after_tree:
        sides: list[Side] = []
        try:
            sides.append(Side("before", before_tree, model, args.threads))
            sides.append(Side("after", after_tree, model, args.threads))
            imported.update({s.name: s.ready() for s in sides})
            print(f"imported: {imported}", flush=True)
            results = summarise(interleave(sides, args.rounds, checkpoint))
        finally:
            for side in sides:
                side.close()
    report(results, args.rounds, args.threads)
    print(f"wrote {write_json(args.out, payload(results, args.rounds))}")


if __name__ == "__main__":
    main()
