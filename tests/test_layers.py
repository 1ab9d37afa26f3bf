"""The layers import downwards only: the library (`mergeflow/`) imports neither the orchestration (prefect,
mlflow, dask) nor the layers above it (`tasks`, `flows`, `mergeflow_app`); tasks do not import flows or the
application; flows do not import the application. Every import counts, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATION = {"prefect", "prefect_dask", "mlflow", "dask", "distributed"}
FORBIDDEN = {
    "mergeflow": ORCHESTRATION | {"tasks", "flows", "mergeflow_app"},
    "tasks": {"flows", "mergeflow_app"},
    "flows": {"mergeflow_app"},
}


def imported_roots(path: Path) -> dict[str, int]:
    """Top-level package of every absolute import in `path` -> first line it appears on."""
    roots: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            roots.setdefault(name.split(".")[0], node.lineno)
    return roots


def violations(layer: str) -> list[str]:
    found = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for root, line in imported_roots(path).items():
            if root in FORBIDDEN[layer]:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {root}")
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_each_layer_imports_only_downwards(layer):
    assert not violations(layer), "\n".join(violations(layer))


def test_the_rule_catches_an_upward_import(tmp_path):
    module = tmp_path / "late.py"
    module.write_text("def f():\n    from flows.merge_flow import merge_flow\n    import mlflow.tracking\n")
    assert imported_roots(module) == {"flows": 2, "mlflow": 3}
