"""The package's shape, checked: short functions with few parameters, no private names used across modules,
no printing outside the command line, and nothing run at import time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "geoswc"
MAX_LINES = 80
MAX_PARAMS = 8
WIDER = {
    ("workflow.py", "train"): "the command's groups: 3 inputs, 3 settings saved with the model, the photos and "
    "run options of fine-tuning, and the provenance recorded in the model",
    ("workflow.py", "evaluate"): "the command's options: the photos and the benchmark they are (--benchmark, as "
    "the field names it), the model and its index, methods, search and run",
    ("workflow.py", "locate"): "the command's groups: the photos, the model and its index, the method, search "
    "settings, the abstention rule, the output file and its format, run options",
    ("workflow.py", "calibrate"): "the command's two sources (out-of-fold features and folds, or a labelled set "
    "with its index and author exclusion), the model, the report, the rule, run",
}
"""Functions allowed one parameter more than MAX_PARAMS, and why."""


def _sources() -> list[tuple[str, ast.Module]]:
    return [
        (p.relative_to(SRC).as_posix(), ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(SRC.rglob("*.py"))
    ]


def _functions(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _params(f: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = f.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + [x.arg for x in (a.vararg, a.kwarg) if x]
    return len([n for n in names if n not in ("self", "cls")])


def test_functions_are_short_and_take_few_parameters() -> None:
    long, wide = [], []
    for rel, tree in _sources():
        for f in _functions(tree):
            if f.end_lineno - f.lineno + 1 > MAX_LINES:  # type: ignore[operator]
                long.append(f"{rel}:{f.lineno} {f.name}")
            if _params(f) > MAX_PARAMS + ((rel, f.name) in WIDER):
                wide.append(f"{rel}:{f.lineno} {f.name} ({_params(f)})")
    assert not long, f"functions over {MAX_LINES} lines: {long}"
    assert not wide, f"functions over {MAX_PARAMS} parameters (group them in a dataclass): {wide}"


def _private_imports(tree: ast.Module) -> list[str]:
    return [
        f"{node.module}.{a.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("geoswc"))
        for a in node.names
        if a.name.startswith("_") and not a.name.startswith("__")
    ]


@pytest.mark.parametrize("folder", ["src", "tests", "benchmarks", "scripts"])
def test_no_private_name_is_imported_from_another_module(folder: str) -> None:
    found = [
        f"{p.relative_to(ROOT)}: {name}"
        for p in sorted((ROOT / folder).rglob("*.py"))
        for name in _private_imports(ast.parse(p.read_text(encoding="utf-8")))
    ]
    assert not found, found


def test_only_the_command_line_prints() -> None:
    prints = [
        f"{rel}:{n.lineno}"
        for rel, tree in _sources()
        if rel != "cli.py"
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
    ]
    assert not prints, f"use logging outside geoswc/cli.py: {prints}"


def test_importing_the_package_is_cheap_and_does_nothing() -> None:
    """`import geoswc` (and the configs and errors) loads no torch, no parser and no web framework, and writes
    nothing. The CLI module is not among them: it builds every command's parser from the workflow functions."""
    code = (
        "import sys, geoswc, geoswc.config, geoswc.core.config, geoswc.core.errors\n"
        "heavy = [m for m in ('torch', 'jsonargparse', 'fastapi') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_steps_are_thin() -> None:
    """A workflow step checks its inputs, calls the library and logs: no function there runs over 40 lines of
    code (its docstring, the command's help, aside); the domain logic lives in the layers below."""
    tree = ast.parse((SRC / "workflow.py").read_text(encoding="utf-8"))
    long = []
    for f in _functions(tree):
        body = f.body[1:] if ast.get_docstring(f) is not None else f.body
        if body and body[-1].end_lineno - body[0].lineno + 1 > 40:  # type: ignore[operator]
            long.append(f.name)
    assert not long, f"workflow steps over 40 lines of code: {long}"
