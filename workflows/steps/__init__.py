"""The model lifecycle's steps: plain typed functions, one module each, that the local runner
calls in-process and Hera templates call in a cluster.

``stage`` (S3 -> model cache, with ``manifest``) and ``verify`` (checksums and a loadable
checkpoint) come first; the registry, deploy, evaluate, benchmark and promote steps follow.
"""
