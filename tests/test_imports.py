"""No import cycle inside the ``fedplora`` package.

Every module under ``fedplora/`` is parsed with ``ast`` (nothing is imported) and the graph of its
imports of other ``fedplora`` modules is built. The rule of what counts as an edge A -> B:

* every ``import fedplora.x`` / ``from fedplora.x import y`` / ``from .x import y`` /
  ``from ..x import y`` statement in A, wherever it stands: at module level, inside ``try`` or
  ``if``, in a class body, AND inside a function. A function-level import defers a dependency, it
  does not remove it: the cycle this test was written for (``config -> tasks -> tasks.partition
  -> config``) had two of its three edges inside functions, so a module-level-only rule would
  have passed it. The one exception is an import under ``if TYPE_CHECKING:`` (never executed;
  its ``else:`` branch is counted);
* the target is the module named, a package meaning its ``__init__.py``; ``from pkg import name``
  is an edge to the submodule ``pkg.name`` when there is one, else to ``pkg``'s ``__init__``;
* importing ``a.b.c`` also runs the ``__init__`` of ``a.b`` (and ``a``), so those packages are
  targets too, except the packages that contain A itself (Python has run them before A starts).

A cycle in that graph fails the test, which prints it (``a -> b -> c -> a``) with the line of
each import. To depend on a module that depends on you, move what both need into a small
module both can import (e.g. ``fedplora/partitioners.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "fedplora"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node of a module, anywhere, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """{module: {imported fedplora module: line of the first import}} by the rule of the docstring."""
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    package = root.name

    def existing(name: str) -> str | None:  # the longest prefix of ``name`` that is a module here
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        own_pkg = mod if is_pkg else mod.rpartition(".")[0]
        containing = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)} | ({mod} if is_pkg else set())
        edges: dict[str, int] = {}

        def add(target: str | None, line: int) -> None:
            if target is None:
                return
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the target and the packages it sits in
                name = ".".join(parts[:i])
                if name != mod and name not in containing and name in files:
                    edges.setdefault(name, line)

        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == package:
                        add(existing(alias.name), node.lineno)
                continue
            if node.level:
                base = own_pkg.split(".")[: len(own_pkg.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == package:
                source = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                add(sub if sub in files else existing(source), node.lineno)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, iters = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph.get(nxt, {}))))
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, int]], root: Path = ROOT) -> str:
    def file(mod: str) -> str:
        rel = mod.replace(".", "/")
        return f"{rel}/__init__.py" if (root.parent / rel).is_dir() else f"{rel}.py"

    steps = [f"  {a} -> {b}  ({file(a)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return "import cycle: " + " -> ".join(cycle) + "\n" + "\n".join(steps)


def test_no_import_cycle_in_fedplora():
    graph = import_graph()
    assert len(graph) > 10 and "fedplora.config" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, describe(cycle, graph)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "fedplora"


def test_the_rule_sees_lazy_relative_and_package_imports(tmp_path):
    # today's cycle before its fix: a lazy import, a package __init__, a relative import two levels up
    pkg = _write(tmp_path, {
        "fedplora/__init__.py": "",
        "fedplora/config.py": "def _tasks():\n    from .tasks import TASKS\n    return TASKS\n",
        "fedplora/tasks/__init__.py": "TASKS = {}\ndef check():\n    from .partition import partition_for\n",
        "fedplora/tasks/partition.py": "from ..config import PARTITIONERS\n",
    })
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and set(cycle) == {"fedplora.config", "fedplora.tasks", "fedplora.tasks.partition"}
    message = describe(cycle, import_graph(pkg), pkg)
    assert "fedplora/tasks/partition.py:1" in message and "fedplora/tasks/__init__.py:3" in message

    # the fix: both import a leaf module
    (pkg / "partitioners.py").write_text("PARTITIONERS = ()\n")
    (pkg / "tasks/partition.py").write_text("from ..partitioners import PARTITIONERS\n")
    assert find_cycle(import_graph(pkg)) is None


def test_the_rule_skips_type_checking_and_counts_absolute_and_parent_packages(tmp_path):
    pkg = _write(tmp_path, {
        "fedplora/__init__.py": "",
        "fedplora/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
        "fedplora/b.py": "import fedplora.a\n",
    })
    assert find_cycle(import_graph(pkg)) is None
    # importing a submodule runs its package's __init__: b -> sub (via sub.leaf) -> b
    _write(tmp_path, {"fedplora/sub/__init__.py": "from .. import b\n", "fedplora/sub/leaf.py": "",
                      "fedplora/b.py": "from fedplora.sub.leaf import x\n"})
    assert set(find_cycle(import_graph(pkg)) or ()) == {"fedplora.b", "fedplora.sub"}
    # a submodule importing its own package is no edge to run it (it already ran)
    _write(tmp_path, {"fedplora/sub/__init__.py": "", "fedplora/sub/leaf.py": "from . import other\n",
                      "fedplora/sub/other.py": "", "fedplora/b.py": "from fedplora.sub.leaf import x\n"})
    assert find_cycle(import_graph(pkg)) is None
