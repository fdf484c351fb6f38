"""``workflows.steps.registry`` and ``strata models|promote|rollback`` against a real MLflow
server (SQLite backend, artifacts on a moto S3 server): the session's ``local_stack``."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from tests.workflows.conftest import LocalStack
from workflows import models_cli
from workflows.steps import registry
from workflows.steps.registry import RegistryError

ENGINE_CONFIG = {"engine": "builtin", "num_workers": 2}


@pytest.fixture(scope="module")
def mlflow_url(local_stack: LocalStack) -> str:
    return local_stack.mlflow_url


def digest(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def make_name() -> str:
    return f"model-{uuid.uuid4().hex[:8]}"


def register(url: str, name: str, n: int) -> registry.RegisteredVersion:
    return registry.register_version(
        url,
        name,
        source_uri=f"s3://strata-models/{name}/",
        staged_dir=f"/cache/{name}-{n}",
        manifest_digest=digest(n),
        engine_config=ENGINE_CONFIG,
    )


def register_passed(url: str, name: str, n: int) -> str:
    version = register(url, name, n).version
    registry.log_version_metrics(
        url, name, version, {}, tags={"eval_passed": "true", "benchmark_passed": "true"}
    )
    return version


def get_run(url: str, run_id: str) -> dict[str, Any]:
    """The run as the server's REST API returns it."""
    response = httpx.get(f"{url}/api/2.0/mlflow/runs/get", params={"run_id": run_id})
    response.raise_for_status()
    return response.json()["run"]


def aliases_of(url: str, name: str) -> dict[str, str]:
    response = httpx.get(f"{url}/api/2.0/mlflow/registered-models/get", params={"name": name})
    response.raise_for_status()
    model = response.json()["registered_model"]
    return {a["alias"]: a["version"] for a in model.get("aliases", [])}


def test_parse_model_uri() -> None:
    assert registry.parse_model_uri("models:/m@production") == ("m", None, "production")
    assert registry.parse_model_uri("models:/m/3") == ("m", "3", None)
    for bad in ("models:/m", "models:/m/x", "runs:/abc/m", "models:/@prod", "m@prod"):
        with pytest.raises(RegistryError, match="not a model URI"):
            registry.parse_model_uri(bad)


@pytest.mark.slow
def test_register_twice_makes_two_versions_with_tags_run_params_and_candidate(
    mlflow_url: str,
) -> None:
    name = make_name()
    first, second = register(mlflow_url, name, 1), register(mlflow_url, name, 2)
    assert (first.version, second.version) == ("1", "2")
    assert first.run_id != second.run_id

    info = registry.get_version(mlflow_url, name, "2")
    assert info.aliases == ["candidate"]
    assert (info.source_uri, info.staged_dir) == (f"s3://strata-models/{name}/", f"/cache/{name}-2")
    assert (info.manifest_digest, info.run_id) == (digest(2), second.run_id)
    assert info.tags["engine_config"] == '{"engine": "builtin", "num_workers": 2}'
    assert registry.get_version(mlflow_url, name, "1").aliases == []
    assert aliases_of(mlflow_url, name) == {"candidate": "2"}

    run = get_run(mlflow_url, second.run_id)
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params == {
        "source_uri": f"s3://strata-models/{name}/",
        "staged_dir": f"/cache/{name}-2",
        "manifest_digest": digest(2),
        "engine_config": '{"engine": "builtin", "num_workers": 2}',
        "engine_config.engine": "builtin",
        "engine_config.num_workers": "2",
    }
    assert run["info"]["status"] == "FINISHED"
    experiment = httpx.get(
        f"{mlflow_url}/api/2.0/mlflow/experiments/get",
        params={"experiment_id": run["info"]["experiment_id"]},
    ).json()["experiment"]
    assert experiment["name"] == f"strata-publish/{name}"


@pytest.mark.slow
def test_metrics_land_on_the_versions_run_and_tags_on_the_version(mlflow_url: str) -> None:
    name = make_name()
    registered = register(mlflow_url, name, 1)
    registry.log_version_metrics(
        mlflow_url, name, "1", {"eval_accuracy": 0.875}, tags={"eval_passed": "true"}
    )
    registry.log_version_metrics(
        mlflow_url, name, "1", {"ttft_p95_ms": 42.5, "itl_p95_ms": 7}, tags=None
    )

    run = get_run(mlflow_url, registered.run_id)
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics == {"eval_accuracy": 0.875, "ttft_p95_ms": 42.5, "itl_p95_ms": 7.0}
    assert registry.get_run_metrics(mlflow_url, registered.run_id) == metrics
    response = httpx.get(
        f"{mlflow_url}/api/2.0/mlflow/model-versions/get", params={"name": name, "version": "1"}
    )
    tags = {t["key"]: t["value"] for t in response.json()["model_version"]["tags"]}
    assert tags["eval_passed"] == "true"
    with pytest.raises(RegistryError, match=rf"version 9 of model '{name}'"):
        registry.log_version_metrics(mlflow_url, name, "9", {"x": 1.0})


@pytest.mark.slow
def test_promote_is_gated_on_eval_and_benchmark_tags(mlflow_url: str) -> None:
    name = make_name()
    register(mlflow_url, name, 1)
    with pytest.raises(RegistryError, match=rf"version 1 of model '{name}' is not promoted: "
                       r"eval_passed=\(unset\), benchmark_passed=\(unset\)"):  # fmt: skip
        registry.promote(mlflow_url, name, "1")
    registry.log_version_metrics(
        mlflow_url, name, "1", {}, tags={"eval_passed": "true", "benchmark_passed": "false"}
    )
    with pytest.raises(RegistryError, match=r"not promoted: benchmark_passed=false \(needs"):
        registry.promote(mlflow_url, name, "1")
    assert aliases_of(mlflow_url, name) == {"candidate": "1"}

    assert registry.promote(mlflow_url, name, "1", force=True) == registry.AliasMove("1", None)
    assert aliases_of(mlflow_url, name) == {"production": "1"}
    with pytest.raises(RegistryError, match=rf"version 7 of model '{name}'"):
        registry.promote(mlflow_url, name, "7", force=True)


@pytest.mark.slow
def test_promote_then_rollback_moves_production_and_previous(mlflow_url: str) -> None:
    name = make_name()
    register_passed(mlflow_url, name, 1)
    register_passed(mlflow_url, name, 2)
    assert aliases_of(mlflow_url, name) == {"candidate": "2"}

    assert registry.promote(mlflow_url, name, "1") == registry.AliasMove("1", None)
    assert aliases_of(mlflow_url, name) == {"candidate": "2", "production": "1"}
    assert registry.promote(mlflow_url, name, "2") == registry.AliasMove("2", "1")
    assert aliases_of(mlflow_url, name) == {"production": "2", "previous": "1"}
    assert registry.promote(mlflow_url, name, "2") == registry.AliasMove("2", "1")  # no change

    resolved = registry.resolve(mlflow_url, f"models:/{name}@production")
    assert (resolved.version, resolved.aliases) == ("2", ["production"])
    assert resolved.staged_dir == f"/cache/{name}-2"

    assert registry.rollback(mlflow_url, name) == registry.AliasMove("1", "2")
    assert aliases_of(mlflow_url, name) == {"production": "1", "previous": "2"}
    assert registry.resolve(mlflow_url, f"models:/{name}@production").version == "1"
    assert registry.rollback(mlflow_url, name) == registry.AliasMove("2", "1")
    assert aliases_of(mlflow_url, name) == {"production": "2", "previous": "1"}


@pytest.mark.slow
def test_rollback_without_previous_fails_naming_the_model(mlflow_url: str) -> None:
    name = make_name()
    register_passed(mlflow_url, name, 1)
    registry.promote(mlflow_url, name, "1")
    no_previous = rf"model '{name}' has no alias 'previous'.*production=1"
    with pytest.raises(RegistryError, match=no_previous):
        registry.rollback(mlflow_url, name)
    with pytest.raises(RegistryError, match="rolling back model 'no-such-model'"):
        registry.rollback(mlflow_url, "no-such-model")


@pytest.mark.slow
def test_resolve_versions_and_aliases_and_name_what_is_missing(mlflow_url: str) -> None:
    name = make_name()
    register(mlflow_url, name, 1)
    register(mlflow_url, name, 2)
    assert registry.resolve(mlflow_url, f"models:/{name}/1").version == "1"
    assert registry.resolve(mlflow_url, f"models:/{name}@candidate").version == "2"
    with pytest.raises(RegistryError, match=rf"resolving models:/{name}@production: .*production"):
        registry.resolve(mlflow_url, f"models:/{name}@production")
    with pytest.raises(RegistryError, match=rf"resolving models:/{name}/5"):
        registry.resolve(mlflow_url, f"models:/{name}/5")


@pytest.mark.slow
def test_list_versions_of_one_model_and_of_all(mlflow_url: str) -> None:
    first, second = make_name(), make_name()
    for n in (1, 2, 3):
        register(mlflow_url, first, n)
    register(mlflow_url, second, 1)
    infos = registry.list_versions(mlflow_url, first)
    assert [(i.name, i.version, i.aliases) for i in infos] == [
        (first, "1", []),
        (first, "2", []),
        (first, "3", ["candidate"]),
    ]
    everything = {(i.name, i.version) for i in registry.list_versions(mlflow_url)}
    assert {(first, "1"), (first, "3"), (second, "1")} <= everything
    with pytest.raises(RegistryError, match="listing versions of model 'absent'"):
        registry.list_versions(mlflow_url, "absent")


def cli_app() -> typer.Typer:
    app = typer.Typer()
    for command in (models_cli.models, models_cli.promote, models_cli.rollback):
        app.command()(command)
    return app


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli_app(), list(args), env={"COLUMNS": "250"})


@pytest.mark.slow
def test_cli_models_promote_and_rollback(mlflow_url: str) -> None:
    name = make_name()
    register(mlflow_url, name, 1)
    register_passed(mlflow_url, name, 2)
    metrics = {"eval_accuracy": 0.9, "bench_ttft_p95_ms": 31.25}
    registry.log_version_metrics(mlflow_url, name, "2", metrics)
    uri = ("--tracking-uri", mlflow_url)

    refused = invoke("promote", name, "1", *uri)
    assert refused.exit_code == 1
    assert f"version 1 of model '{name}' is not promoted" in refused.output
    assert "--force" in refused.output
    forced = invoke("promote", name, "1", "--force", *uri)
    assert forced.exit_code == 0, forced.output
    assert f"{name}: production -> version 1, previous -> (none)" in forced.output
    promoted = invoke("promote", name, "2", *uri)
    assert promoted.exit_code == 0, promoted.output
    assert f"{name}: production -> version 2, previous -> version 1" in promoted.output

    # Piped (not a terminal), in 80 columns: one line per version, one word per cell.
    listed = CliRunner().invoke(cli_app(), ["models", "--name", name, *uri], env={"COLUMNS": "80"})
    assert listed.exit_code == 0, listed.output
    header, *lines = listed.output.splitlines()
    assert header.split() == ["NAME", "VERSION", "ALIASES", "SOURCE", "MANIFEST", "EVAL_ACC",
                              "TTFT_P95", "CREATED"]  # fmt: skip
    rows = {fields[1]: fields for fields in (line.split() for line in lines)}
    assert set(rows) == {"1", "2"} and len(lines) == 2
    source = f"s3://strata-models/{name}/"
    assert rows["1"][:7] == [name, "1", "previous", source, digest(1)[:12], "-", "-"]
    assert rows["2"][:7] == [name, "2", "production", source, digest(2)[:12], "0.900", "31.2ms"]
    assert rows["2"][7].endswith("Z")

    as_json = invoke("models", "--name", name, "--output", "json", *uri)
    assert as_json.exit_code == 0, as_json.output
    records = {r["version"]: r for r in json.loads(as_json.output)}
    assert records["2"]["aliases"] == ["production"]
    assert records["2"]["eval_accuracy"] == 0.9 and records["2"]["ttft_p95_ms"] == 31.25
    assert records["1"]["manifest_digest"] == digest(1) and records["1"]["eval_accuracy"] is None

    rolled = invoke("rollback", name, *uri)
    assert rolled.exit_code == 0, rolled.output
    assert f"{name}: production -> version 1, previous -> version 2" in rolled.output
    assert aliases_of(mlflow_url, name) == {"production": "1", "previous": "2"}

    missing = invoke("rollback", "no-such-model", *uri)
    assert missing.exit_code == 1 and "rolling back model 'no-such-model'" in missing.output


def test_cli_help_shows_the_tracking_uri_env_var() -> None:
    result = CliRunner().invoke(cli_app(), ["models", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0 and "MLFLOW_TRACKING_URI" in result.output
