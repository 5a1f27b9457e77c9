"""The folder tree is the architecture: subpackages are layers, and a module imports only from its own layer or
the ones below it. The order is written here once (and drawn in docs/architecture.md, The layer map).

Every ``import`` in ``src/geoswc`` counts, at the top of a module, inside a function or under
``TYPE_CHECKING``: a type-only reference to a higher layer is still a dependency on it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "geoswc"

LAYERS = [
    ("core", "errors, config dataclasses, atomic and checksummed files, sphere math, progress, process group"),
    ("geo", "S2 cells and places"),
    ("data", "photos: decoding, preprocessing, CSV layouts, records, shards, sources"),
    ("gallery", "the gallery: within-cell search, FAISS codes, files on disk, thumbnails"),
    ("models", "backbone registry, heads, GeoModel, ONNX, the compatibility check"),
    ("training", "feature caches, training the heads, fine-tuning, positives, checkpoints"),
    ("prediction", "SwC, calibration, results, the Geolocator"),
    ("evaluation", "metrics, evaluate, compare, cross-fitting, benchmark sets"),
    ("service", "the web service"),
    ("", "the command layer: workflow, cli, recipes, and the public names of geoswc/__init__.py"),
]
"""Lowest first. ``""`` is the package's own folder: the commands and the public entry points."""

RANK = {name: i for i, (name, _) in enumerate(LAYERS)}
MAX_FUNCTION_IMPORTS = 15
"""Imports inside functions: only for optional dependencies or import-time cost, each saying why in a comment."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else ""


def resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def existing(target: str) -> str:
    """The module a dotted import names: ``geoswc.core`` + ``errors`` is the module ``geoswc.core.errors``."""
    path = SRC.joinpath(*target.split("."))
    if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
        return target
    return target.rsplit(".", 1)[0]


def scan() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """Module -> the geoswc modules it imports; and every import inside a function (module, line, text)."""
    graph: dict[str, set[str]] = defaultdict(set)
    in_functions: list[tuple[str, int, str]] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module, source = module_name(path), path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        graph[module]
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inner = {id(n) for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = resolve(node, module, path.name == "__init__.py")
                targets = [existing(f"{base}.{a.name}") for a in node.names] if base.startswith("geoswc") else []
            elif isinstance(node, ast.Import):
                targets = [existing(a.name) for a in node.names if a.name.startswith("geoswc")]
            else:
                continue
            graph[module].update(t for t in targets if t != module)
            if id(node) in inner:
                in_functions.append((module, node.lineno, lines[node.end_lineno - 1]))
    return graph, in_functions


GRAPH, IN_FUNCTIONS = scan()


def test_every_folder_is_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == {name for name, _ in LAYERS if name}, "a new subpackage needs its place in LAYERS"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_from_a_higher_layer(module):
    mine = RANK[layer_of(module)]
    upward = sorted(t for t in GRAPH[module] if RANK[layer_of(t)] > mine)
    assert not upward, f"{module} (layer {layer_of(module) or 'commands'}) imports from higher layers: {upward}"


def test_no_import_cycle():
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        seen[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if seen.get(target) == 1:
                cycle = path[path.index(target) :] + [target] if target in path else [module, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in seen:
                visit(target, [*path, target])
        seen[module] = 2

    for module in sorted(GRAPH):
        if module not in seen:
            visit(module, [module])


def test_imports_inside_functions_are_few_and_say_why():
    assert len(IN_FUNCTIONS) < MAX_FUNCTION_IMPORTS, "\n".join(f"{m}:{n} {t.strip()}" for m, n, t in IN_FUNCTIONS)
    silent = [f"{m}:{n} {t.strip()}" for m, n, t in IN_FUNCTIONS if "#" not in t]
    assert not silent, "an import inside a function says why on its line (optional dependency, import-time cost):\n" + (
        "\n".join(silent)
    )


def test_the_scan_sees_what_it_should():
    """The checks above are only as good as the scan: it must see known edges, or a green run means nothing."""
    assert "geoswc.core.errors" in GRAPH["geoswc.core.atomic_files"]
    assert "geoswc.prediction.geolocator" in GRAPH["geoswc.workflow"]
    assert layer_of("geoswc.workflow") == "" and layer_of("geoswc.core.errors") == "core"
    assert layer_of("geoswc.service") == "service" and layer_of("geoswc") == ""
