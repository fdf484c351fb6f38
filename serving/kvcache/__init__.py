"""KV tiers below the device: G2 host memory, G3 local disk, G4 S3 (see docs/kv-tiers.md).

``header`` (block header + checksum), ``tier`` (the ``KVTier`` interface) with ``host``,
``disk`` and ``s3`` stores, ``policy`` (cost check, frequency filter) and ``stack`` (the pure
index and planner the engine thread owns), ``manager`` (the threads that move bytes).
"""
