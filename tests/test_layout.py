"""The layout the code promises (README "Layout", ../shared/DESIGN.md): packages import only
downward, no file over 400 lines, no function over 60."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rcnn_trainer"
# lowest first; a package may import only from its own layer or below
LAYERS = [
    {"errors", "dist_state", "input_limits", "atomic_io", "safe_load", "run_folder"},
    {"config_base", "config_monitor", "config_data", "config_model", "config_solver", "config", "config_loader",
     "config_logging"},
    {"writers"},  # metrics.jsonl records -> TensorBoard / MLflow: reads the config, nothing of the model
    {"data", "losses"},
    {"model", "runtime"},
    {"monitor", "analysis"},
    {"infer"},
    {"train"},
    {"cli", "__init__"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def imports_by_package() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        source = path.relative_to(PACKAGE).with_suffix("").parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rcnn_trainer."):
                target = node.module.split(".")[1]
                if target != source:
                    edges[source].add(target)
    return edges


def test_every_package_has_a_layer_and_imports_only_downward():
    edges = imports_by_package()
    unplaced = {p for p in edges} | {t for targets in edges.values() for t in targets}
    assert unplaced - LAYER_OF.keys() == set()
    upward = [(s, t) for s, targets in edges.items() for t in targets if LAYER_OF[t] > LAYER_OF[s]]
    assert upward == []
    same_layer = [(s, t) for s, targets in edges.items() for t in targets
                  if LAYER_OF[t] == LAYER_OF[s] and s in edges.get(t, set())]
    assert same_layer == []  # no cycle between packages of one layer either


def test_files_and_functions_stay_small():
    long_files = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if len(p.read_text().splitlines()) > 400]
    long_functions = [f"{p.relative_to(PACKAGE)}:{n.name}" for p in PACKAGE.rglob("*.py")
                      for n in ast.walk(ast.parse(p.read_text()))
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= 60]
    assert long_files == [] and long_functions == []
