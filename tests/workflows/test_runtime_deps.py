"""The cluster image installs only ``[project] dependencies``: everything serving and the workflow
steps import must come from those (and what they require), never from an extra.

Two checks. Statically, every import (module-level and inside functions) reachable from the
runtime entry points is mapped to its distribution, which must be in the runtime closure.
Dynamically, a fresh interpreter that cannot import any extra-only package imports every
runtime module and runs ``strata --help`` and ``strata step --help``.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = {"serving", "workflows", "bench", "grafana"}
# What runs in the cluster: `strata step NAME` (every step), `strata worker`, `strata serve`.
RUNTIME_ENTRY_MODULES = (
    "workflows.step_cli",
    "serving.worker.__main__",
    "serving.frontend.__main__",
)
# Optional at runtime, imported only where they apply: NIXL (a loud TCP fallback without it;
# installed apart with --no-deps) and Triton (ships with the CUDA torch wheel; CUDA only).
OPTIONAL_IMPORTS = {"nixl": {"nixl", "nixl-cu12"}, "triton": {"triton"}}


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def closure(requirements: list[str]) -> set[str]:
    """Canonical names of the distributions ``requirements`` install, transitively."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        extras = set(req.extras)
        key = name + "[" + ",".join(sorted(extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append(sub)
    return {k.partition("[")[0] for k in seen}


def module_file(module: str) -> Path | None:
    path = REPO_ROOT.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def imported_names(module: str) -> set[str]:
    """Every module name ``module`` imports, at module level or inside functions."""
    path = module_file(module)
    assert path is not None, module
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def runtime_imports() -> tuple[set[str], dict[str, set[str]]]:
    """(project modules reachable from the entry points, third-party top-level name -> the
    project modules that import it)."""
    seen: set[str] = set()
    third_party: dict[str, set[str]] = {}
    todo = list(RUNTIME_ENTRY_MODULES)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in imported_names(module):
            top = name.partition(".")[0]
            if top in PROJECT_PACKAGES:
                if module_file(name) is not None:
                    todo.append(name)
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                third_party.setdefault(top, set()).add(module)
    return seen, third_party


def extra_only_modules(runtime: set[str]) -> set[str]:
    """Top-level import names of distributions that only an extra installs."""
    extras = pyproject()["project"]["optional-dependencies"]
    everything = closure(
        [r for reqs in extras.values() for r in reqs if not r.startswith("strata[")]
    )
    blocked: set[str] = set()
    for top, dists in md.packages_distributions().items():
        names = {canonicalize_name(d) for d in dists}
        if names & everything and not names & runtime:
            blocked.add(top)
    return blocked


def test_runtime_imports_come_from_runtime_dependencies() -> None:
    runtime = closure(pyproject()["project"]["dependencies"])
    _, third_party = runtime_imports()
    top_to_dists = md.packages_distributions()
    missing = {}
    for top, importers in sorted(third_party.items()):
        dists = {canonicalize_name(d) for d in top_to_dists.get(top, [top])}
        if top not in OPTIONAL_IMPORTS and not dists & runtime:
            missing[top] = sorted(importers)
    assert missing == {}, f"imported at runtime but only in an extra (or nowhere): {missing}"


def test_test_and_demo_packages_are_extras_only() -> None:
    runtime = closure(pyproject()["project"]["dependencies"])
    for name in ("moto", "matplotlib", "jsonschema", "kubernetes-validate", "pytest", "gguf"):
        assert canonicalize_name(name) not in runtime, name
    extras = pyproject()["project"]["optional-dependencies"]
    assert any(r.startswith("moto") for r in extras["local"])
    assert {"strata[local,bench,convert]"} <= set(extras["dev"])


@pytest.mark.slow
def test_runtime_modules_import_without_any_extra() -> None:
    """About 10 s: imports torch, transformers and mlflow in a fresh interpreter."""
    runtime = closure(pyproject()["project"]["dependencies"])
    modules, third_party = runtime_imports()
    optional_users = {m for top in OPTIONAL_IMPORTS for m in third_party.get(top, ())}
    modules -= optional_users
    blocked = extra_only_modules(runtime)
    assert {"moto", "matplotlib", "jsonschema", "kubernetes_validate"} <= blocked
    script = f"""
import importlib, sys
for name in {sorted(blocked)!r}:
    sys.modules[name] = None  # as if not installed: import fails, find_spec returns None
for module in {sorted(modules)!r}:
    importlib.import_module(module)
from workflows.cli import app
for args in (["--help"], ["step", "--help"], ["worker", "--help"], ["serve", "--help"]):
    try:
        app(args)
    except SystemExit as exc:
        assert exc.code == 0, (args, exc.code)
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "100"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
