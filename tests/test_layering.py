"""The package's layering: no import cycle among jaxlens modules (top-level or inside functions), no module
imported by a string (which would hide a cycle from this check), `jaxlens.hub` below the converters, and the
`converters/` folder importable only as `jaxlens.converters`."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SOURCES = {"jaxlens": ROOT / "jaxlens", "jaxlens.converters": ROOT / "converters"}  # pyproject's package-dir


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in SOURCES.items():
        for f in folder.rglob("*.py"):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = f
    return out


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module that `name` (a module, or a name inside one) belongs to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str, path: Path) -> set[str]:
    """The jaxlens modules `name` imports anywhere in its file (a package's submodule counts as itself)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {_owner(a.name) for a in node.names if a.name.startswith("jaxlens")}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = f"{base}.{module}" if module else base
            if module.startswith("jaxlens"):
                out |= {f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else _owner(module)
                        for a in node.names}
    return out - {name, None}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    assert graph["jaxlens.cli"] >= {"jaxlens.demo", "jaxlens.converters"}  # the walk sees imports at all
    assert _cycles(graph) == []


def test_the_cycle_check_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_is_imported_by_a_string():
    pattern = re.compile(r"import_module\(|__import__\(|_gguf_attr|load_gguf")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in MODULES.values()
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_hub_is_below_the_converters():
    assert _imports("jaxlens.hub", MODULES["jaxlens.hub"]) == {"jaxlens.errors"}


def test_converters_folder_is_never_imported_under_its_own_name():
    files = [*MODULES.values(), *ROOT.joinpath("tests").rglob("*.py")]
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in files
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.match(r"\s*(import converters\b|from converters\b)", line)]
    assert offenders == []
    proc = subprocess.run([sys.executable, "-c", "import converters"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "import `jaxlens.converters`" in proc.stderr


@pytest.mark.parametrize("module", ["jaxlens.cli", "jaxlens.demo", "jaxlens.converters", "jaxlens.hub",
                                    "jaxlens.analysis"])
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
