"""A ``sitecustomize`` for the vLLM processes ``strata serve`` starts with a NIXL connector.

The directory goes first on their ``PYTHONPATH`` (``launcher.vllm_env``); see
``sitecustomize.py``, whose progress-delay helper Strata's own NIXL transport uses too. Nothing
here imports Strata: vLLM runs in a virtual environment of its own.
"""
