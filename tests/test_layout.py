"""The layout: three parties in three packages, and no import cycles between modules."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("verifier", "broker", "host_install", "guest", "sim")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _module_level(tree: ast.AST, typing: bool) -> list[ast.AST]:
    found: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        todo += [c for c in ast.iter_child_nodes(node) if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and (typing or not _is_type_checking(c))]
    return found


def _imports(path: Path, name: str, known: set[str], typing: bool) -> set[str]:
    """Project modules a module imports at import time (and with `typing`, in TYPE_CHECKING blocks; an
    import inside a function, run only when called, never counts)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _module_level(ast.parse(path.read_text()), typing):
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


def _graph(typing: bool = False) -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    known = set(files)
    return {name: _imports(path, name, known, typing) for name, path in files.items()}


def test_measure_launch_does_not_import_its_cache() -> None:
    g = _graph(typing=True)  # not even for type hints: launch takes any cache through a Protocol
    assert "verifier.measure.cache" not in g["verifier.measure.launch"]
    assert "verifier.measure.launch" in g["verifier.measure.cache"]


def test_no_module_imports_itself_through_others_at_import_time() -> None:
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
