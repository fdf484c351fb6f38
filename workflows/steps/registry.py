"""``register`` and the alias moves: the model lifecycle's view of the MLflow registry.

One registered model per name; one version per publish, whose ``source`` is the S3 URI the
weights came from and whose ``run_id`` is a run in experiment ``strata-publish/<name>`` that
holds the publish parameters and, later, the evaluation and benchmark metrics. Aliases::

    candidate   the newest registered version, until it is promoted
    production  what ``models:/<name>@production`` serves
    previous    the production before the last promotion; ``rollback`` swaps it back

Every call takes the tracking URI and builds one explicit ``MlflowClient`` (never the fluent
API's active run). Stages are deprecated in MLflow and never used. Every failure raises
``RegistryError`` naming the model, version or alias at fault.

Owns registry reads and writes; never deploys, switches traffic or touches the model cache.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

CANDIDATE = "candidate"
PRODUCTION = "production"
PREVIOUS = "previous"
# Version tags the evaluate and benchmark steps set; promotion needs both "true".
PROMOTION_GATES = ("eval_passed", "benchmark_passed")
EXPERIMENT_PREFIX = "strata-publish/"


class RegistryError(Exception):
    """A registry read or write failed, or a gate refused; the message names the model,
    version or alias."""


@dataclass(frozen=True, slots=True)
class RegisteredVersion:
    version: str
    run_id: str


@dataclass(frozen=True, slots=True)
class VersionInfo:
    version: str
    staged_dir: str
    source_uri: str
    manifest_digest: str
    run_id: str
    aliases: list[str]
    name: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    created_ms: int = 0  # creation time, milliseconds since the epoch


@dataclass(frozen=True, slots=True)
class AliasMove:
    """Where ``production`` and ``previous`` point after a promotion or rollback."""

    production: str
    previous: str | None


def make_client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def register_version(
    tracking_uri: str,
    name: str,
    *,
    source_uri: str,
    staged_dir: str,
    manifest_digest: str,
    engine_config: dict[str, Any],
) -> RegisteredVersion:
    """Create the registered model if missing, a publish run holding the parameters, and a new
    version pointing at ``source_uri`` with alias ``candidate``.

    Not idempotent: every call makes a new version, even for a manifest digest already
    registered (a retried register step may leave an extra, unaliased version behind; it is
    harmless and shows in ``strata models``). The run ends FINISHED here; the evaluate and
    benchmark steps still log metrics to it later.
    """
    client = make_client(tracking_uri)
    engine_json = json.dumps(engine_config, sort_keys=True)
    tags = {
        "source_uri": source_uri,
        "manifest_digest": manifest_digest,
        "staged_dir": staged_dir,
        "engine_config": engine_json,
    }
    with _errors(f"registering a version of model {name!r} from {source_uri}"):
        _ensure_registered_model(client, name)
        run = client.create_run(
            _ensure_experiment(client, EXPERIMENT_PREFIX + name),
            run_name=f"publish-{manifest_digest[:12]}",
            tags={"strata.model_name": name},
        )
        run_id = run.info.run_id
        params = tags | {f"engine_config.{k}": _param_value(v) for k, v in engine_config.items()}
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        created = client.create_model_version(
            name,
            source_uri,
            run_id=run_id,
            tags=tags,
            description=f"Published from {source_uri} (manifest sha256 {manifest_digest}).",
        )
        client.set_tag(run_id, "strata.model_version", created.version)
        client.set_terminated(run_id, "FINISHED")
        client.set_registered_model_alias(name, CANDIDATE, created.version)
    return RegisteredVersion(version=str(created.version), run_id=run_id)


def get_version(tracking_uri: str, name: str, version: str) -> VersionInfo:
    with _errors(f"reading version {version} of model {name!r}"):
        return _info(make_client(tracking_uri).get_model_version(name, str(version)))


def get_run_metrics(tracking_uri: str, run_id: str) -> dict[str, float]:
    """The latest value of each metric on a version's run."""
    with _errors(f"reading metrics of run {run_id}"):
        return dict(make_client(tracking_uri).get_run(run_id).data.metrics)


def log_version_metrics(
    tracking_uri: str,
    name: str,
    version: str,
    metrics: dict[str, float],
    tags: dict[str, str] | None = None,
) -> None:
    """Log ``metrics`` on the version's run and set ``tags`` on the version itself."""
    client = make_client(tracking_uri)
    with _errors(f"logging metrics for version {version} of model {name!r}"):
        model_version = client.get_model_version(name, str(version))
        if not model_version.run_id:
            raise RegistryError(f"version {version} of model {name!r} has no run to log to")
        timestamp_ms = _now_ms()
        client.log_batch(
            model_version.run_id,
            metrics=[Metric(k, float(v), timestamp_ms, 0) for k, v in metrics.items()],
        )
        for key, value in (tags or {}).items():
            client.set_model_version_tag(name, str(version), key, value)


def promote(tracking_uri: str, name: str, version: str, *, force: bool = False) -> AliasMove:
    """Point ``production`` at ``version``; the old production becomes ``previous``, and
    ``candidate`` is removed if it pointed at ``version``.

    Refuses unless the version carries ``eval_passed=true`` and ``benchmark_passed=true``
    (``force`` skips that check). Promoting the current production changes nothing.
    """
    client = make_client(tracking_uri)
    version = str(version)
    with _errors(f"promoting version {version} of model {name!r}"):
        model_version = client.get_model_version(name, version)
        if not force:
            failed = [g for g in PROMOTION_GATES if model_version.tags.get(g) != "true"]
            if failed:
                raise RegistryError(
                    f"version {version} of model {name!r} is not promoted: "
                    + ", ".join(f"{g}={model_version.tags.get(g, '(unset)')}" for g in failed)
                    + " (needs true; --force to override)"
                )
        aliases = client.get_registered_model(name).aliases
        current = aliases.get(PRODUCTION)
        # `previous` first: a failure between the two writes leaves production untouched.
        if current is not None and current != version:
            client.set_registered_model_alias(name, PREVIOUS, current)
            aliases[PREVIOUS] = current
        client.set_registered_model_alias(name, PRODUCTION, version)
        if aliases.get(CANDIDATE) == version:
            client.delete_registered_model_alias(name, CANDIDATE)
    return AliasMove(production=version, previous=aliases.get(PREVIOUS))


def rollback(tracking_uri: str, name: str) -> AliasMove:
    """Swap ``production`` and ``previous``: rolling back twice returns to where it started.
    Without a ``production``, ``previous`` becomes production and is removed."""
    client = make_client(tracking_uri)
    with _errors(f"rolling back model {name!r}"):
        aliases = client.get_registered_model(name).aliases
        target = aliases.get(PREVIOUS)
        if target is None:
            raise RegistryError(
                f"model {name!r} has no alias {PREVIOUS!r} to roll back to "
                f"(aliases: {_format_aliases(aliases)})"
            )
        current = aliases.get(PRODUCTION)
        client.set_registered_model_alias(name, PRODUCTION, target)
        if current is None or current == target:
            client.delete_registered_model_alias(name, PREVIOUS)
            return AliasMove(production=target, previous=None)
        client.set_registered_model_alias(name, PREVIOUS, current)
    return AliasMove(production=target, previous=current)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, None, alias); ``models:/name/3`` -> (name, "3", None)."""
    prefix = "models:/"
    rest = uri[len(prefix) :] if uri.startswith(prefix) else ""
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias and "/" not in alias:
            return name, None, alias
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, version, None
    raise RegistryError(f"not a model URI: {uri!r} (expected models:/NAME@ALIAS or models:/NAME/N)")


def resolve(tracking_uri: str, uri: str) -> VersionInfo:
    """The version a ``models:/`` URI names now."""
    name, version, alias = parse_model_uri(uri)
    client = make_client(tracking_uri)
    with _errors(f"resolving {uri}"):
        if alias is not None:
            return _info(client.get_model_version_by_alias(name, alias))
        return _info(client.get_model_version(name, str(version)))


def list_versions(tracking_uri: str, name: str | None = None) -> list[VersionInfo]:
    """Every version of ``name`` (or of every registered model), by name then version."""
    client = make_client(tracking_uri)
    what = f"model {name!r}" if name else "all models"
    with _errors(f"listing versions of {what}"):
        if name is not None:
            models = [client.get_registered_model(name)]
        else:
            models = list(_pages(client.search_registered_models))
        infos: list[VersionInfo] = []
        for model in models:
            version_to_aliases: dict[str, list[str]] = {}
            for alias, version in sorted(model.aliases.items()):
                version_to_aliases.setdefault(str(version), []).append(alias)
            query = f"name='{_quote(model.name)}'"
            for mv in _pages(client.search_model_versions, filter_string=query):
                infos.append(_info(mv, version_to_aliases.get(str(mv.version), [])))
    return sorted(infos, key=lambda i: (i.name, int(i.version)))


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(
            name, description="Published by Strata; versions come from `strata publish`."
        )
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def _ensure_experiment(client: MlflowClient, experiment_name: str) -> str:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(experiment_name)
    except MlflowException as exc:  # created concurrently by another publish
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(experiment_name).experiment_id


def _info(mv: ModelVersion, aliases: list[str] | None = None) -> VersionInfo:
    tags = dict(mv.tags)
    return VersionInfo(
        version=str(mv.version),
        staged_dir=tags.get("staged_dir", ""),
        source_uri=mv.source or tags.get("source_uri", ""),
        manifest_digest=tags.get("manifest_digest", ""),
        run_id=mv.run_id or "",
        aliases=sorted(mv.aliases if aliases is None else aliases),
        name=mv.name,
        tags=tags,
        created_ms=int(mv.creation_timestamp or 0),
    )


def _pages(search: Any, **kwargs: Any) -> Iterator[Any]:
    """Every item of a paged MLflow search."""
    page_token = None
    while True:
        page = search(page_token=page_token, **kwargs)
        yield from page
        page_token = page.token
        if not page_token:
            return


def _param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _quote(name: str) -> str:
    return name.replace("\\", "\\\\").replace("'", "\\'")


def _format_aliases(aliases: dict[str, str]) -> str:
    return ", ".join(f"{a}={v}" for a, v in sorted(aliases.items())) or "none"


def _now_ms() -> int:
    return int(time.time() * 1000)


@contextlib.contextmanager
def _errors(doing: str) -> Iterator[None]:
    """Re-raise ``MlflowException`` as ``RegistryError`` prefixed with what was being done."""
    try:
        yield
    except MlflowException as exc:
        raise RegistryError(f"{doing}: {exc.message}") from exc
