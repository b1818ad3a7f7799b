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


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `g` (module -> modules it imports) as a path, or None."""
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for dep in sorted(g.get(m, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep, stack + [dep])):
                return found
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    """Imports that point up the layers or sideways between two layers of one rank."""
    bad = []
    for m, deps in g.items():
        if m in ("edge", "convert"):
            continue
        for dep in deps:
            if dep in ("edge", "convert"):
                continue
            a, b = layer(m), layer(dep)
            if a != b and RANK[b] >= RANK[a]:
                bad.append(f"{m} ({a}) imports {dep} ({b})")
    return sorted(bad)


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers():
    bad = upward_imports(graph())
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_cycle_and_an_upward_import():
    g = graph()
    assert "edge.engine.engine" in g["edge.engine.scheduler"]      # the walker resolves imports
    assert find_cycle(g) is None and upward_imports(g) == []
    planted = {m: set(deps) for m, deps in g.items()}
    planted["edge.engine.engine"].add("edge.engine.scheduler")      # the scheduler imports the engine
    cycle = find_cycle(planted)
    assert cycle is not None and {"edge.engine.engine", "edge.engine.scheduler"} <= set(cycle), cycle
    upward = {m: set(deps) for m, deps in g.items()}
    upward["edge.model.kv_cache"].add("edge.api.runtime")           # the model layer reaching an interface
    upward["edge.api.runtime"].add("edge.serial.jsonl")             # one interface importing another
    assert upward_imports(upward) == ["edge.api.runtime (edge.api) imports edge.serial.jsonl (edge.serial)",
                                      "edge.model.kv_cache (edge.model) imports edge.api.runtime (edge.api)"]
