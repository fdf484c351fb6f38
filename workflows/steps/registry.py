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
from mlflow.protos.databricks_pb2 import (
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)

CANDIDATE = "candidate"
PRODUCTION = "production"
PREVIOUS = "previous"
# Version tags the evaluate and benchmark steps set; promotion needs both "true".
PROMOTION_GATES = ("eval_passed", "benchmark_passed")
EXPERIMENT_PREFIX = "strata-publish/"


PUBLISH_RUN_TAG = "strata.publish_run"  # the publish run (Argo workflow uid) that made a version


class RegistryError(Exception):
    """A registry read or write failed, or a gate refused; the message names the model,
    version or alias. Not worth retrying: the same call fails the same way."""

    retryable = False


class RegistryUnavailable(RegistryError):
    """The tracking server could not be reached or answered 5xx: retrying may succeed."""

    retryable = True


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
    publish_run: str = "",
) -> RegisteredVersion:
    """Create the registered model if missing, a publish run holding the parameters, and a new
    version pointing at ``source_uri`` with alias ``candidate``.

    Idempotent per ``publish_run`` (the workflow run's id): a retry after a crash, a lost
    response or a tracking server restart finds the version that run already made (by its
    ``strata.publish_run`` tag) and finishes it instead of making another. The version is created
    in one request carrying every tag, after its run is complete, so a version is never
    half-registered; duplicates of one publish run (a POST the client retried after the server
    had committed it) are deleted, keeping the lowest. Without ``publish_run`` every call makes
    a new version.
    """
    client = make_client(tracking_uri)
    engine_json = json.dumps(engine_config, sort_keys=True)
    tags = {
        "source_uri": source_uri,
        "manifest_digest": manifest_digest,
        "staged_dir": staged_dir,
        "engine_config": engine_json,
    }
    if publish_run:
        tags[PUBLISH_RUN_TAG] = publish_run
    with _errors(f"registering a version of model {name!r} from {source_uri}"):
        _ensure_registered_model(client, name)
        existing = _versions_of_run(client, name, publish_run)
        if existing:
            version, run_id = str(existing[0].version), existing[0].run_id
        else:
            run_id = _publish_run(client, name, manifest_digest, publish_run, tags, engine_config)
            created = client.create_model_version(
                name,
                source_uri,
                run_id=run_id,
                tags=tags,
                description=f"Published from {source_uri} (manifest sha256 {manifest_digest}).",
            )
            # A POST the client retried may have made two: the lowest is the one kept.
            found = _versions_of_run(client, name, publish_run)
            version = str(found[0].version) if found else str(created.version)
            client.set_tag(run_id, "strata.model_version", version)
        _drop_duplicates(client, name, publish_run, keep=version)
        client.set_registered_model_alias(name, CANDIDATE, version)
    return RegisteredVersion(version=version, run_id=run_id)


def find_run_version(tracking_uri: str, name: str, publish_run: str) -> str | None:
    """The version publish run ``publish_run`` registered, if any."""
    with _errors(f"looking up the version publish run {publish_run} made of model {name!r}"):
        found = _versions_of_run(make_client(tracking_uri), name, publish_run)
    return str(found[0].version) if found else None


def _versions_of_run(client: MlflowClient, name: str, publish_run: str) -> list[ModelVersion]:
    """Versions of ``name`` tagged with ``publish_run``, lowest first."""
    if not publish_run:
        return []
    query = f"name='{_quote(name)}' and tags.`{PUBLISH_RUN_TAG}` = '{_quote(publish_run)}'"
    try:
        found = list(_pages(client.search_model_versions, filter_string=query))
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return []
        raise
    return sorted(found, key=lambda mv: int(mv.version))


def _publish_run(
    client: MlflowClient,
    name: str,
    manifest_digest: str,
    publish_run: str,
    tags: dict[str, str],
    engine_config: dict[str, Any],
) -> str:
    """The FINISHED MLflow run holding the publish parameters (reused on a retry)."""
    experiment_id = _ensure_experiment(client, EXPERIMENT_PREFIX + name)
    run_id = None
    if publish_run:
        query = f"tags.`{PUBLISH_RUN_TAG}` = '{_quote(publish_run)}'"
        runs = client.search_runs([experiment_id], filter_string=query, max_results=1)
        run_id = runs[0].info.run_id if runs else None
    if run_id is None:
        run_tags = {"strata.model_name": name} | (
            {PUBLISH_RUN_TAG: publish_run} if publish_run else {}
        )
        run = client.create_run(
            experiment_id, run_name=f"publish-{manifest_digest[:12]}", tags=run_tags
        )
        run_id = run.info.run_id
    params = tags | {f"engine_config.{k}": _param_value(v) for k, v in engine_config.items()}
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _drop_duplicates(client: MlflowClient, name: str, publish_run: str, keep: str) -> None:
    for mv in _versions_of_run(client, name, publish_run):
        if str(mv.version) != keep and not mv.aliases:
            client.delete_model_version(name, str(mv.version))


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


def get_aliases(tracking_uri: str, name: str) -> dict[str, str]:
    """Alias -> version of model ``name``."""
    with _errors(f"reading the aliases of model {name!r}"):
        aliases = make_client(tracking_uri).get_registered_model(name).aliases
    return {alias: str(version) for alias, version in aliases.items()}


def restore_aliases(tracking_uri: str, name: str, aliases: dict[str, str]) -> None:
    """Put ``candidate``, ``production`` and ``previous`` back where ``aliases`` (an earlier
    ``get_aliases``) had them; production first, so it never points at nothing it did not."""
    client = make_client(tracking_uri)
    with _errors(f"restoring the aliases of model {name!r}"):
        current = client.get_registered_model(name).aliases
        for alias in (PRODUCTION, PREVIOUS, CANDIDATE):
            wanted = aliases.get(alias)
            if wanted is not None and str(current.get(alias)) != wanted:
                client.set_registered_model_alias(name, alias, wanted)
            elif wanted is None and alias in current:
                client.delete_registered_model_alias(name, alias)


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
    """Re-raise ``MlflowException`` as ``RegistryError`` prefixed with what was being done:
    ``RegistryUnavailable`` when the server was unreachable or answered 5xx (the MLflow client
    reports a connection failure as INTERNAL_ERROR, 500)."""
    try:
        yield
    except MlflowException as exc:
        if exc.get_http_status_code() >= 500:
            raise RegistryUnavailable(f"{doing}: {exc.message}") from exc
        raise RegistryError(f"{doing}: {exc.message}") from exc
