"""``strata platform``: render the Kubernetes side of one environment for review.

One values file describes an environment; each section goes to one chart under ``platform/``,
rendered offline by the Helm SDK (helm-python-sdk, no ``helm`` binary, no cluster)::

    namespace: strata             where the serving stack and the workflows run
    release: smollm2              release name of the strata chart
    image: {repository, tag}      the one image, passed to strata and strata-workflows
    strata: {...}                 platform/helm/strata           (one model deployment)
    karpenter: {...}              platform/karpenter             (node pools; omit to skip)
    storage: {...}                platform/storage               (model cache PVC; omit to skip)
    workflows: {...}              platform/argo/strata-workflows (templates + RBAC; omit to skip)

``render`` writes ``DIR/<chart>/<template>.yaml`` plus the upstream Argo chart's values, so
``kubectl diff -R -f DIR`` or a review shows exactly what would be applied. ``generate``
rewrites the WorkflowTemplates the strata-workflows chart carries from ``workflows/argo.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

REPO_ROOT = Path(__file__).resolve().parents[1]
PLATFORM_DIR = REPO_ROOT / "platform"
CHARTS = {  # values section -> chart directory under platform/
    "strata": Path("helm/strata"),
    "karpenter": Path("karpenter"),
    "storage": Path("storage"),
    "workflows": Path("argo/strata-workflows"),
}
ARGO_VALUES = Path("argo/argo-workflows-values.yaml")
WORKFLOW_TEMPLATES_DIR = PLATFORM_DIR / CHARTS["workflows"] / "files"
# Cluster-scoped charts are released into these namespaces.
CHART_NAMESPACES = {"karpenter": "kube-system"}
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class PlatformError(Exception):
    """The environment cannot be rendered; the message names the file, section and field."""


class ImageValues(BaseModel):
    model_config = ConfigDict(extra="forbid")
    repository: str = Field(min_length=1)
    tag: str = ""


class EnvironmentValues(BaseModel):
    """The top level of an environment's values file; each chart checks its own section."""

    model_config = ConfigDict(extra="forbid")
    namespace: str = Field(default="strata", pattern=DNS_LABEL, max_length=63)
    release: str = Field(pattern=DNS_LABEL, max_length=30)
    image: ImageValues | None = None
    strata: dict[str, Any]
    karpenter: dict[str, Any] | None = None
    storage: dict[str, Any] | None = None
    workflows: dict[str, Any] | None = None


def load_environment(path: Path) -> EnvironmentValues:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PlatformError(f"{path}: cannot read the values file: {exc}") from exc
    if not isinstance(raw, dict):
        raise PlatformError(f"{path}: expected a mapping at the top level")
    try:
        return EnvironmentValues.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'values'}: {err['msg']}"
            for err in exc.errors()
        )
        raise PlatformError(f"{path}: {problems}") from None


def chart_values(env: EnvironmentValues) -> dict[str, dict[str, Any]]:
    """Each chart's values, with what the charts must agree on filled in from one place: the
    image, and the model-cache claim (storage's claimName unless a section names its own)."""
    sections = {k: dict(v) for k in CHARTS if (v := getattr(env, k)) is not None}
    image = env.image.model_dump() if env.image else None
    claim = (env.storage or {}).get("claimName")
    strata = sections["strata"]
    if image:
        strata.setdefault("image", dict(image))
    if claim:
        strata["modelCache"] = {"claimName": claim, **strata.get("modelCache", {})}
    if "workflows" in sections:
        workflows = sections["workflows"]
        if image:
            workflows.setdefault("image", dict(image))
        if claim:
            workflows.setdefault("modelCachePvc", claim)
    return sections


def render_chart(section: str, values: dict[str, Any], *, release: str, namespace: str) -> dict:
    """``{template path: rendered text}`` of one chart; raises ``PlatformError``."""
    import helm_python

    chart_dir = PLATFORM_DIR / CHARTS[section]
    try:
        chart = helm_python.Chart.load(chart_dir)
        return chart.render(values, name=release, namespace=namespace, is_install=True)
    except helm_python.HelmError as exc:
        raise PlatformError(f"section {section!r} ({chart_dir.name} chart): {exc}") from exc


def render_environment(env: EnvironmentValues) -> dict[Path, str]:
    """Every rendered file, by its path relative to the output directory."""
    files: dict[Path, str] = {}
    for section, values in chart_values(env).items():
        release = env.release if section == "strata" else f"strata-{section}"
        namespace = CHART_NAMESPACES.get(section, env.namespace)
        rendered = render_chart(section, values, release=release, namespace=namespace)
        for template, text in sorted(rendered.items()):
            if text.strip() and not template.endswith("NOTES.txt"):
                chart_name, _, rest = template.partition("/templates/")
                files[Path(chart_name) / rest] = text.lstrip("\n")
    if env.workflows is not None:
        files[Path("argo-workflows") / "values.yaml"] = (PLATFORM_DIR / ARGO_VALUES).read_text()
    check_planner_config(parse_objects(files))
    return files


def check_planner_config(objects: list[dict[str, Any]]) -> None:
    """The planner's ConfigMap parses as ``strata planner`` will read it (and its inline
    profile as a profile), so a bad ``planner.config`` key fails at render, not in the pod."""
    from serving.planner.config import ConfigError, parse_config
    from serving.planner.profile import PerfProfile

    for obj in objects:
        labels = obj.get("metadata", {}).get("labels") or {}
        if obj["kind"] != "ConfigMap" or labels.get("app.kubernetes.io/component") != "planner":
            continue
        where = f"section 'strata' (strata chart): planner ConfigMap {obj['metadata']['name']}"
        data = obj.get("data") or {}
        try:
            parse_config(yaml.safe_load(data["config.yaml"]), source=f"{where}, config.yaml")
            if "profile.json" in data:
                PerfProfile.model_validate_json(data["profile.json"])
        except ConfigError as exc:
            raise PlatformError(str(exc)) from None
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise PlatformError(f"{where}, profile.json (planner.profile): {field}: "
                                f"{first['msg']}") from None  # fmt: skip


def parse_objects(files: dict[Path, str]) -> list[dict[str, Any]]:
    """The Kubernetes objects in rendered files (empty documents dropped)."""
    objects = []
    for path, text in files.items():
        if path.parts[0] == "argo-workflows":
            continue  # values for the upstream chart, not objects
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def write_files(files: dict[Path, str], out_dir: Path) -> None:
    """Replace ``out_dir``'s rendered content with ``files`` (nothing stale left behind)."""
    for chart_dir in {path.parts[0] for path in files}:
        shutil.rmtree(out_dir / chart_dir, ignore_errors=True)
    for path, text in files.items():
        (out_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / path).write_text(text)


def workflow_template_files() -> dict[Path, str]:
    """The WorkflowTemplates the strata-workflows chart carries, as Hera renders them."""
    from workflows.argo import build_templates

    header = "# Generated by `strata platform generate` from workflows/argo.py: edit that.\n"
    return {
        WORKFLOW_TEMPLATES_DIR / f"{t.name}.yaml": header + t.to_yaml() for t in build_templates()
    }


app = typer.Typer(no_args_is_help=True, help="Render the cluster side of an environment.")


@app.command("render")
def render(
    values: Annotated[Path, typer.Option("--values", "-f", help="Environment values file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write into.")],
) -> None:
    """Render every chart of the environment into DIR for review (no cluster needed)."""
    try:
        files = render_environment(load_environment(values))
    except PlatformError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    write_files(files, out)
    num_objects = len(parse_objects(files))
    typer.echo(f"rendered {num_objects} objects into {len(files)} files under {out}")


@app.command("generate")
def generate(
    check: Annotated[
        bool, typer.Option(help="Write nothing; exit 1 when a file is stale.")
    ] = False,
) -> None:
    """Write the strata-workflows chart's WorkflowTemplates from workflows/argo.py."""
    files = workflow_template_files()
    stale = [p for p, text in files.items() if not p.is_file() or p.read_text() != text]
    if check:
        for path in stale:
            typer.echo(f"out of date: {path.relative_to(REPO_ROOT)}", err=True)
        raise typer.Exit(1 if stale else 0)
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        typer.echo(str(path.relative_to(REPO_ROOT)))
