"""Assemble and run one worker process: engine, KV-event publisher, metrics, HTTP server."""

from __future__ import annotations

import logging

import uvicorn

from serving.engine.factory import LoadedEngine, build_engine
from serving.engine.output_processor import OutputProcessor
from serving.kvcache.build import build_tiers
from serving.kvcache.loop import TierLoop
from serving.kvcache.metrics import TierMetrics
from serving.startup import freeze_startup_heap
from serving.worker.app import create_app
from serving.worker.config import WorkerConfig
from serving.worker.efa import check_efa
from serving.worker.engine_loop import AsyncEngine
from serving.worker.kv_connector import KVConnector, make_connector
from serving.worker.kv_events import NullEventPublisher, ZmqEventPublisher
from serving.worker.metrics import WorkerMetrics
from serving.worker.state import WorkerState

logger = logging.getLogger(__name__)


def build_state(config: WorkerConfig, loaded: LoadedEngine | None = None) -> WorkerState:
    """Everything but the HTTP server; tests call this with a prebuilt engine."""
    efa = check_efa(config.efa, config.efa_sysfs_dir)  # before minutes of weight loading
    loaded = loaded or build_engine(config.engine, config.model_names[0])
    publisher: ZmqEventPublisher | NullEventPublisher
    extra: dict[str, object] = {"engine": config.engine.engine}
    if config.kv_events_port is not None:
        host = config.kv_events_host
        replay_port = config.kv_events_port + 1 if config.kv_events_port else 0
        publisher = ZmqEventPublisher(
            endpoint=f"tcp://{host}:{config.kv_events_port}",
            replay_endpoint=f"tcp://{host}:{replay_port}",
            data_parallel_rank=None,
        )
        extra["kv_events_port"] = publisher.bound_port
        extra["kv_events_replay_port"] = publisher.bound_replay_port
        logger.info(
            "KV events on tcp://%s:%s (replay %s)",
            host,
            publisher.bound_port,
            publisher.bound_replay_port,
        )
    else:
        publisher = NullEventPublisher()
    extra["block_size"] = loaded.core.limits.block_size
    connector = _make_connector(config, loaded)
    extra["role"] = config.role
    extra["kv_transport"] = connector.transport.metadata() if connector else None
    extra["kv_transport_fallback"] = connector.is_fallback if connector else False
    extra["efa"] = efa.state
    tokenizer = loaded.tokenizer
    processor = OutputProcessor(tokenizer.backend_tokenizer if tokenizer is not None else None)
    metrics = WorkerMetrics(
        config.model_names[0],
        engine="0",
        role=config.role,
        transport=connector.kind if connector else "none",
        transport_fallback=connector.is_fallback if connector else False,
        efa=efa.state,
    )
    tiers = _make_tiers(config, loaded, metrics)
    extra["kv_tiers"] = [s.name for s in tiers.manager.stores.values()] if tiers else []
    engine = AsyncEngine(loaded.core, processor, metrics, publisher, connector, tiers)
    return WorkerState(
        engine=engine,
        info=loaded.info,
        tokenizer=tokenizer,
        served_model_names=config.model_names,
        extra_health=extra,
    )


def _make_tiers(
    config: WorkerConfig, loaded: LoadedEngine, metrics: WorkerMetrics
) -> TierLoop | None:
    manager = build_tiers(config.kv_tiers, loaded.core, config.engine.model_dir)
    if manager is None:
        return None
    tier_metrics = TierMetrics(
        metrics.registry,
        metrics.labels,
        list(manager.stores),
        transfer_bytes=metrics.transfer_bytes_family,
    )
    return TierLoop(loaded.core, manager, tier_metrics)


def _make_connector(config: WorkerConfig, loaded: LoadedEngine) -> KVConnector | None:
    kind = config.resolved_kv_transport
    if kind == "none":
        if config.role != "both":
            logger.warning(
                "role %s without a KV transport: remote prefill requests will be prefilled "
                "locally and prefill results cannot be pulled",
                config.role,
            )
        return None
    executor = loaded.core.executor
    kv_cache = getattr(executor, "kv_cache", None)  # the mock engine has none
    connector = make_connector(
        kind,
        kv_cache=kv_cache,
        num_blocks=loaded.core.limits.num_blocks,
        host=config.kv_transfer_host or config.host,
        port=config.kv_transfer_port,
        modelled_bytes_per_token=executor.kv_bytes_per_token if kv_cache is None else None,
        modelled_bandwidth_bytes_per_s=config.mock_kv_bandwidth_gbps * 1e9,
    )
    logger.info(
        "role %s, KV transport %s at %s",
        config.role,
        connector.kind,
        connector.transport.metadata(),
    )
    return connector


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: report 503 on /health, let in-flight requests finish, then stop."""

    def __init__(self, config: uvicorn.Config, state: WorkerState) -> None:
        super().__init__(config)
        self.worker_state = state

    def handle_exit(self, sig: int, frame: object) -> None:
        if not self.worker_state.draining:
            self.worker_state.draining = True
            logger.info(
                "draining: %d requests in flight", self.worker_state.engine.num_active_requests
            )
        super().handle_exit(sig, frame)


def run_worker(config: WorkerConfig) -> None:
    state = build_state(config)
    app = create_app(state)
    freeze_startup_heap()  # the model and the engine are built: long-lived from here on
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=int(config.drain_timeout_s),
        access_log=False,
    )
    server = DrainingServer(uv_config, state)
    print(
        f"strata worker: serving {config.model_names[0]} on http://{config.host}:{config.port}/v1",
        flush=True,
    )
    server.run()
