"""The tree's layering, checked: no import cycles among edge/ and convert/ modules, and
imports only point down the layers (see edge/__init__.py)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# higher imports lower; siblings of one rank do not import each other
RANK = {"edge.model": 0, "convert": 1, "edge.engine": 1, "edge.launch": 2, "edge.api": 3, "edge.serial": 3, "edge.assist": 3,
        "edge.service": 4, "edge.cli": 5}


def modules() -> dict[str, Path]:
    found = {}
    for top in ("edge", "convert"):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(path: Path, name: str, known: dict) -> set[str]:
    """Modules of ours this file imports, anywhere in it (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, name, known) for name, path in known.items()}


def layer(module: str) -> str:
    return next(p for p in sorted(RANK, key=len, reverse=True) if module == p or module.startswith(p + "."))


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for dep in g[m]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


def test_imports_point_down_the_layers():
    bad = []
    for m, deps in graph().items():
        if m in ("edge", "convert"):
            continue
        for dep in deps:
            if dep in ("edge", "convert"):
                continue
            a, b = layer(m), layer(dep)
            if a != b and RANK[b] >= RANK[a]:
                bad.append(f"{m} ({a}) imports {dep} ({b})")
    assert not bad, "\n".join(sorted(bad))


def test_the_checker_sees_a_cycle_and_an_upward_import():
    assert "edge.engine.engine" in graph()["edge.engine.scheduler"]      # the walker resolves imports
    assert layer("edge.api.openai_api") == "edge.api" and RANK["edge.api"] > RANK["edge.engine"]
