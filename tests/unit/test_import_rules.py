"""The folders of spillcache._internal say what their modules may import (each folder's
__init__.py says why): the rules below are checked on every import in src, type-only
imports (under TYPE_CHECKING) included; and no module imports itself back through
others."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "spillcache"
INTERNAL = f"{PACKAGE}._internal"

# The folder a module belongs to: a folder of _internal, "base" (the helpers directly in
# _internal), or "public" (the spillcache package itself).
ALLOWED = {
    "base": {"base", "errors"},
    "io": {"io", "base", "errors"},
    "store": {"store", "io", "base", "errors"},
    "engine": {"engine", "store", "io", "base", "errors"},
    "process": {"process", "store", "io", "base", "errors", "config"},
    "runtime": {"runtime", "engine", "store", "io", "process", "base", "errors", "config"},
    "stock": {"stock", "base", "errors", "public"},
    "llmcompressor": {
        "llmcompressor", "runtime", "engine", "store", "io", "process", "base", "errors",
        "config", "public",
    },
    "cli": {
        "cli", "llmcompressor", "runtime", "engine", "store", "io", "process", "base",
        "errors", "config", "public",
    },
}  # fmt: skip
FOLDERS = set(ALLOWED) - {"base"}
MOST_PER_FOLDER = 15
MOST_MODULES = 48  # in src, not counting the folders' __init__.py
MOST_LINES = 500  # per module


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def folder_of(module: str) -> str:
    if module == f"{PACKAGE}.errors":
        return "errors"
    if module == f"{PACKAGE}.config":
        return "config"
    if not module.startswith(INTERNAL + "."):
        return "public"
    first = module[len(INTERNAL) + 1 :].split(".")[0]
    return first if first in FOLDERS else "base"


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts}
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    target = f"{source}.{alias.name}"
                    target = target if target in paths else source
                    if target in paths and target != module:
                        graph[module].add(target)
            elif isinstance(node, ast.Import):
                graph[module].update(a.name for a in node.names if a.name in paths)
    # A package's __init__ is where its modules are reached through, not a dependency.
    packages = {m for m, p in paths.items() if p.name == "__init__.py"}
    return {m: {t for t in targets if t not in packages} for m, targets in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def short(module: str) -> str:
    return module.removeprefix(INTERNAL + ".").removeprefix(PACKAGE + ".")


def broken_rules(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{short(module)} ({folder_of(module)}) imports {short(target)} ({folder_of(target)})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if folder_of(module) in ALLOWED and folder_of(target) not in ALLOWED[folder_of(module)]
    ]


def test_every_import_follows_its_folders_rule():
    assert broken_rules(import_graph()) == []


def test_no_module_imports_itself_back():
    found = [{short(m) for m in component} for component in cycles(import_graph())]
    assert found == []


def test_no_folder_holds_more_than_fifteen_modules():
    counts: dict[Path, int] = defaultdict(int)
    for path in SRC.rglob("*.py"):
        if path.name != "__init__.py" and "__pycache__" not in path.parts:
            counts[path.parent.relative_to(SRC)] += 1
    assert {str(d): n for d, n in counts.items() if n > MOST_PER_FOLDER} == {}


def test_src_holds_at_most_48_modules_of_at_most_500_lines():
    files = [path for path in SRC.rglob("*.py") if "__pycache__" not in path.parts]
    assert len([path for path in files if path.name != "__init__.py"]) <= MOST_MODULES
    lines = {str(path.relative_to(SRC)): len(path.read_text().splitlines()) for path in files}
    assert {name: n for name, n in lines.items() if n > MOST_LINES} == {}


def test_the_checks_see_what_they_are_for():
    # A module of io importing the engine is reported; the engine importing io is not.
    graph = {
        f"{INTERNAL}.io.arena": {f"{INTERNAL}.engine.placement"},
        f"{INTERNAL}.engine.placement": {f"{INTERNAL}.io.arena", f"{INTERNAL}.dtypes"},
    }
    assert broken_rules(graph) == ["io.arena (io) imports engine.placement (engine)"]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [{"a", "b"}]
    # The graph of src sees type-only imports and sibling imports within a folder.
    real = import_graph()
    assert f"{INTERNAL}.engine.transaction" in real[f"{INTERNAL}.engine.placement"]
    assert f"{INTERNAL}.engine.records" in real[f"{INTERNAL}.engine.transaction"]  # type-only
