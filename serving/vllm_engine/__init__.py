"""Stock vLLM as a Strata worker: find and launch it, and discover what it publishes.

Nothing here imports ``vllm``: vLLM runs in its own interpreter (``.venv-vllm`` or any
``vllm`` installation), and Strata talks to it over vLLM's public HTTP, ZMQ and Prometheus
interfaces only. See ``docs/vllm.md``.
"""
