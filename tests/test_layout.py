"""The package's layering, checked by walking every import (module-level and inside functions) with ``ast``.

- no import circle among captioner's modules;
- ``captioner.training`` is imported only from ``training/`` itself and the commands (``captioner.cli``);
- ``captioner.data`` imports nothing from ``models/``, ``training/``, ``decoding/`` or ``evaluation``;
- no library module imports a command module (``captioner.cli``);
- functions of the job layer stay short (a longer one says why in its docstring).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "captioner"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the captioner modules it imports (anywhere in the file), resolved to existing modules."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps: set[str] = set()
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for n in names:
                if n.startswith("captioner"):
                    while n and n not in files:  # `from captioner.data import shapes` -> captioner.data.shapes
                        n = n.rpartition(".")[0]
                    if n and n != mod:
                        deps.add(n)
        graph[mod] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, or None (iterative DFS with colours)."""
    colour = {m: 0 for m in graph}
    for root in graph:
        if colour[root]:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        colour[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif colour.get(nxt) == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return None


def test_the_walker_finds_real_imports_and_circles():
    graph = import_graph()
    assert "captioner.models.decoder" in graph["captioner.decoding.beam"]
    assert "captioner.data.shapes" in graph["captioner.cli.shapes"]  # `from captioner.data import shapes`
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    assert _cycle(import_graph()) is None


def _importers_of(prefix: str) -> dict[str, set[str]]:
    return {m: {d for d in deps if d == prefix or d.startswith(prefix + ".")} for m, deps in import_graph().items()}


def test_training_is_imported_only_by_training_and_the_commands():
    bad = {m: d for m, d in _importers_of("captioner.training").items()
           if d and not (m.startswith("captioner.training") or m.startswith("captioner.cli"))}
    assert not bad, bad


@pytest.mark.parametrize("layer", ["captioner.models", "captioner.training", "captioner.decoding", "captioner.evaluation",
                                   "captioner.cli"])
def test_data_layer_imports_no_higher_layer(layer):
    bad = {m: d for m, d in _importers_of(layer).items() if d and m.startswith("captioner.data")}
    assert not bad, bad


def test_no_library_module_imports_a_command():
    bad = {m: d for m, d in _importers_of("captioner.cli").items() if d and not m.startswith("captioner.cli")}
    assert not bad, bad


JOB_LAYER = ["training", "evaluation.py", "prepare.py", "data/build.py", "cli"]


def test_job_layer_functions_are_short_or_say_why():
    long = []
    for entry in JOB_LAYER:
        target = PACKAGE / entry
        for path in ([target] if target.is_file() else sorted(target.rglob("*.py"))):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    doc = ast.get_docstring(node) or ""
                    if n > 60 and "long because" not in doc.lower():
                        long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({n} lines)")
    assert not long, long
