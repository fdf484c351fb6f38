"""What a long-running process does once its start-up is over."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Move every object alive after start-up (the modules, torch, transformers, the tokenizers,
    a worker's model: ~360k objects) out of the cyclic GC's reach, as vLLM (``freeze_gc_heap``)
    and SGLang (``freeze_gc``) do. A full collection over that heap holds the GIL for 200-370 ms;
    while it runs every stream in flight waits (seen under aiperf's light load as a TTFT cluster
    of all 16 requests, and in a worker as a 150 ms stall of a KV onboard). After the freeze a
    full collection walks only what requests left behind (~2 ms). Objects frozen here stay freed
    by reference counting; only cycles among them are kept."""
    gc.collect()
    gc.freeze()
