"""The layout: three parties in three packages, and no import cycles between modules."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("verifier", "broker", "host_install", "guest", "sim")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level(tree: ast.AST) -> list[ast.AST]:
    found: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        todo += [c for c in ast.iter_child_nodes(node) if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return found


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules a module imports at import time or for typing (TYPE_CHECKING blocks count; an import
    inside a function, run only when called, does not)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _module_level(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # a package's own __init__ is not a cycle
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    known = set(files)
    return {name: _imports(path, name, known) for name, path in files.items()}


def test_measure_launch_does_not_import_its_cache() -> None:
    g = _graph()
    assert "verifier.measure.cache" not in g["verifier.measure.launch"]
    assert "verifier.measure.launch" in g["verifier.measure.cache"]


def test_no_module_imports_itself_through_others() -> None:
    g = _graph()
    cycles = []
    for start in sorted(g):
        seen, stack = set(), [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in g.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join([*trail, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
    assert cycles == []


def test_the_verifier_imports_no_other_party() -> None:
    g = _graph()
    others = [f"{m} -> {d}" for m, deps in g.items() if m.startswith("verifier")
              for d in deps if not d.startswith("verifier")]
    assert others == []
