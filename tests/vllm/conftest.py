"""tests/vllm: the session's vLLM pool and KV-event capture (``tests/vllm/fixtures.py``)."""

from tests.vllm.fixtures import vllm_kv_capture, vllm_pool, vllm_worker

__all__ = ["vllm_kv_capture", "vllm_pool", "vllm_worker"]
