"""The package's floors import downward only, and no file imports itself round a cycle.

ground: training/, nn/, audio/, diffusion/ · models/ · frozen/ (trained stages, no Task) · tasks/ ·
pipelines/ · launch/. Imports are read with `ast` (function-level ones included), so a lazy import
that runs up the layers counts as much as one at the top of a file.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "melody_jax"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path) -> set[str]:
    """Every melody_jax module `path` imports (a `from pkg import name` counts as pkg.name when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("melody_jax"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("melody_jax"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES else node.module)
    return out


FILES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
MODULES = set(FILES)
GRAPH = {name: imports(path) & MODULES for name, path in FILES.items()}


def floor(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def offenders(source: str, *targets: str) -> list[str]:
    return sorted(f"{m} → {i}" for m, deps in GRAPH.items() if floor(m) == source
                  for i in deps if floor(i) in targets)


@pytest.mark.parametrize("source, targets", [
    ("tasks", ("pipelines",)),
    ("training", ("tasks", "models", "frozen", "pipelines")),
    ("frozen", ("tasks", "pipelines")),
    ("models", ("tasks", "pipelines", "frozen")),
])
def test_no_import_runs_up_the_layers(source, targets):
    assert offenders(source, *targets) == []


def test_no_import_cycle_between_files():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []
