"""The architecture's promises, checked over the ``ast`` of every module in src/manydoors.

Every import counts for the cycle and direction rules: top-level ones, those under
``if TYPE_CHECKING:`` and those inside functions. Only the imports that run when a
module is imported (top level, not TYPE_CHECKING, not in a function) count for what
the fork server's preload of ``manydoors.server.worker`` pulls in; importing a module
also runs its packages' ``__init__``, so those count there too.

An edge goes to the module an import names: ``from .pkg import mod`` to ``pkg.mod`` when
that is a module, else to ``pkg``. Packages a module lives in are not edges of it (a
package ``__init__`` importing its own submodules is not a cycle).
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import manydoors

TOP: str = "top"  # runs at import time
TYPING: str = "typing"  # under if TYPE_CHECKING
LATE: str = "late"  # inside a function: runs when it is called

FORBIDDEN_IN_WORKERS = ("aiohttp", "rich", "redis", "jwt", "prometheus_client")


@dataclass(frozen=True)
class Import:
    target: str  # a module of the tree, or the full dotted name of an outside one
    when: str  # TOP, TYPING or LATE
    line: int
    internal: bool


@dataclass
class Tree:
    """The modules of one package tree and what each imports."""

    package: str
    files: dict[str, Path] = field(default_factory=dict)
    imports: dict[str, list[Import]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # internal imports of no module

    def edges(self, when: Iterable[str] = (TOP, TYPING, LATE)) -> dict[str, set[str]]:
        kinds = set(when)
        return {
            m: {i.target for i in imps if i.internal and i.when in kinds and i.target != m}
            for m, imps in self.imports.items()
        }

    def external(self, module: str, when: str = TOP) -> set[str]:
        """The outside top-level packages ``module`` imports (``redis`` for redis.asyncio)."""
        return {
            i.target.split(".")[0]
            for i in self.imports[module]
            if not i.internal and i.when == when
        }


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    def __init__(self) -> None:
        self.found: list[tuple[ast.Import | ast.ImportFrom, str]] = []
        self.when = TOP

    def _under(self, when: str, nodes: Iterable[ast.AST]) -> None:
        before = self.when
        # Inside a function stays LATE; TYPE_CHECKING inside TOP makes it TYPING.
        if before == TOP or when == LATE:
            self.when = when
        for node in nodes:
            self.visit(node)
        self.when = before

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append((node, self.when))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append((node, self.when))

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        # Decorators and defaults run at definition time; the body does not.
        if not isinstance(node, ast.Lambda):
            for deco in node.decorator_list:
                self.visit(deco)
            if node.returns is not None:
                self.visit(node.returns)
        self.visit(node.args)
        body = node.body if isinstance(node.body, list) else [node.body]
        self._under(LATE, body)

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function
    visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        negated = isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
        subject = test.operand if isinstance(test, ast.UnaryOp) and negated else test
        if _is_type_checking(subject):
            typed, runtime = (node.orelse, node.body) if negated else (node.body, node.orelse)
            self._under(TYPING, typed)
            self._under(TOP, runtime)
        else:
            self.generic_visit(node)


def load_tree(root: Path, package: str) -> Tree:
    """Every ``.py`` under ``root`` (the directory of ``package``) and its imports."""
    tree = Tree(package)
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        tree.files[".".join(parts)] = path
    for module, path in tree.files.items():
        is_package = path.name == "__init__.py"
        collector = _Collector()
        collector.visit(ast.parse(path.read_text(), str(path)))
        out: list[Import] = []
        for node, when in collector.found:
            for target in _targets(tree, module, is_package, node):
                internal = target == package or target.startswith(package + ".")
                if internal and target not in tree.files:
                    tree.missing.append(f"{module}:{node.lineno} imports {target}")
                    continue
                out.append(Import(target, when, node.lineno, internal))
        tree.imports[module] = out
    return tree


def _targets(
    tree: Tree, module: str, is_package: bool, node: ast.Import | ast.ImportFrom
) -> list[str]:
    if isinstance(node, ast.Import):
        return [_longest_module(tree, alias.name) for alias in node.names]
    if node.level:
        here = module.split(".") if is_package else module.split(".")[:-1]
        base = here[: len(here) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        out.append(sub if sub in tree.files else source)
    return out


def _longest_module(tree: Tree, name: str) -> str:
    """``import a.b.c`` of an outside name stays as is; of ours, the module it names."""
    if not (name == tree.package or name.startswith(tree.package + ".")):
        return name
    parts = name.split(".")
    while parts and ".".join(parts) not in tree.files:
        parts.pop()
    return ".".join(parts) if parts else name


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) through each strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan; the trees are small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1 or v in edges.get(v, ()):
                groups.append(group)

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return [_cycle_in(edges, group) for group in groups]


def _cycle_in(edges: dict[str, set[str]], group: set[str]) -> list[str]:
    """The shortest way from the group's first module back to itself, inside the group."""
    start = min(group)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(edges.get(v, set()) & group):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if w not in came_from:
                came_from[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle in {group}")  # pragma: no cover


def reachable(tree: Tree, start: str) -> dict[str, list[str]]:
    """Modules imported when ``start`` is: each with the chain of imports that gets there."""
    edges = tree.edges(when=(TOP,))

    def with_packages(module: str) -> list[str]:
        parts = module.split(".")
        return [".".join(parts[:n]) for n in range(1, len(parts))]  # its packages run first

    chains: dict[str, list[str]] = {start: [start]}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(edges[v]) + with_packages(v):
            if w in tree.files and w not in chains:
                chains[w] = [*chains[v], w]
                queue.append(w)
    return chains


def package_of(module: str) -> str:
    """``manydoors.server.pools`` -> ``server``; a top-level module is its own package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


ROOT = Path(manydoors.__file__).parent
TREE = load_tree(ROOT, "manydoors")
EDGES = TREE.edges()


def imports_from(source: str, target: str) -> list[str]:
    """Each import of a module of package ``source`` from package ``target``."""
    return [
        f"{m}:{i.line} ({i.when}) imports {i.target}"
        for m, imps in sorted(TREE.imports.items())
        if package_of(m) == source
        for i in imps
        if i.internal and package_of(i.target) == target
    ]


# --- the analysis sees what is there --------------------------------------------------------


def test_every_module_of_src_is_read() -> None:
    assert len(TREE.files) == len(list(ROOT.rglob("*.py")))
    for module in (
        "manydoors",
        "manydoors.config",
        "manydoors.server.worker",
        "manydoors.server.pools",
        "manydoors.server.nodestats",
        "manydoors.node.procfs",
        "manydoors.protocol.ipc",
    ):
        assert module in TREE.files


def test_the_analysis_finds_known_imports_of_each_kind() -> None:
    # Without these the rules below could pass over an analysis that finds nothing.
    assert "manydoors.node.link" in EDGES["manydoors.server.worker"]  # from ..node.link
    assert "manydoors.server.tls" in EDGES["manydoors.server.worker"]  # from . import tls
    assert "manydoors.node.procfs" in EDGES["manydoors.server.nodestats"]
    late = {i.target for i in TREE.imports["manydoors.server.supervisor"] if i.when == LATE}
    assert "manydoors.server.api" in late  # imported in run(): aiohttp stays out of workers
    assert "aiohttp" in TREE.external("manydoors.server.api")
    assert "jwt" in {i.target for i in TREE.imports["manydoors.server.tokens"] if i.when == LATE}


def test_every_internal_import_names_a_module_that_exists() -> None:
    assert TREE.missing == []


# --- the rules ---------------------------------------------------------------------------------


def test_no_import_cycle_between_modules() -> None:
    cycles = find_cycles(EDGES)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("package", ["broker", "protocol", "node", "doctor", "loadgen"])
def test_lower_packages_import_nothing_from_the_server(package: str) -> None:
    assert imports_from(package, "server") == []


def test_protocol_imports_nothing_of_manydoors_but_itself() -> None:
    wrong = [
        f"{m}:{i.line} imports {i.target}"
        for m, imps in TREE.imports.items()
        if package_of(m) == "protocol"
        for i in imps
        if i.internal and package_of(i.target) != "protocol"
    ]
    assert wrong == []


def test_node_imports_only_the_protocol_and_itself() -> None:
    wrong = [
        f"{m}:{i.line} imports {i.target}"
        for m, imps in TREE.imports.items()
        if package_of(m) == "node"
        for i in imps
        if i.internal and package_of(i.target) not in ("node", "protocol")
    ]
    assert wrong == []


def test_doctor_imports_nothing_from_the_load_generator() -> None:
    assert imports_from("doctor", "loadgen") == []


def test_the_workers_preload_pulls_in_no_heavy_library() -> None:
    chains = reachable(TREE, "manydoors.server.worker")
    assert "manydoors.node.procfs" in chains  # sanity: the walk follows imports
    assert "manydoors.server" in chains  # ... and the packages they run first
    wrong = [
        f"{' -> '.join(chain)} imports {lib}"
        for module, chain in sorted(chains.items())
        for lib in sorted(TREE.external(module) & set(FORBIDDEN_IN_WORKERS))
    ]
    assert wrong == []


# --- the checker itself, over a small tree it must judge ---------------------------------------


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_checker_reports_a_cycle_through_every_kind_of_import(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from . import b\n",
            "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import X\n",
            "c.py": "def f():\n    import pkg.a\n",
            "d.py": "from .a import something\n",
        },
    )
    tree = load_tree(root, "pkg")
    assert find_cycles(tree.edges()) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert find_cycles(tree.edges(when=(TOP,))) == []


def test_checker_reports_a_module_importing_itself_and_a_missing_module(tmp_path: Path) -> None:
    root = write(tmp_path, {"__init__.py": "", "a.py": "from .nothing import x\n"})
    tree = load_tree(root, "pkg")
    assert tree.missing == ["pkg.a:1 imports pkg.nothing"]
    assert find_cycles({"x": {"x"}}) == [["x", "x"]]


def test_checker_follows_only_imports_that_run_at_import_time(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        {
            "__init__.py": "",
            "sub/__init__.py": "import rich\n",
            "sub/w.py": (
                "from typing import TYPE_CHECKING\n"
                "from .. import light\n"
                "if TYPE_CHECKING:\n    from .. import typed\nelse:\n    import json\n"
                "def later():\n    from .. import heavy\n"
                "class K:\n    from ..light import y\n"
            ),
            "light.py": "import redis.asyncio as r\n",
            "typed.py": "import aiohttp\n",
            "heavy.py": "import jwt\n",
        },
    )
    tree = load_tree(root, "pkg")
    chains = reachable(tree, "pkg.sub.w")
    assert set(chains) == {"pkg.sub.w", "pkg.light", "pkg", "pkg.sub"}
    assert chains["pkg.light"] == ["pkg.sub.w", "pkg.light"]
    assert tree.external("pkg.light") == {"redis"}
    assert tree.external("pkg.sub") == {"rich"}  # the package's __init__ runs too
    assert tree.external("pkg.sub.w") == {"typing", "json"}
    whens = {i.target: i.when for i in tree.imports["pkg.sub.w"]}
    assert whens == {
        "typing": TOP,
        "pkg.light": TOP,
        "pkg.typed": TYPING,
        "json": TOP,
        "pkg.heavy": LATE,
    }
