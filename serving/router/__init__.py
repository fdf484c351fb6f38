"""Router: KV-aware worker selection.

``block_set`` is pure (events in, held blocks out); ``subscriber`` owns the ZMQ sockets that
bring each worker's KV events in. Import the modules directly so pure code never pulls in zmq.
"""
