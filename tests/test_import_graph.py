"""The static import graph of the attndsl package: no cycles, and imports only go down the layers.

The graph is built from the source text (``ast``), never by importing the modules: every
``import`` / ``from ... import`` statement anywhere in a file (module level, in functions, under
``if TYPE_CHECKING``) is an edge. ``TYPE_CHECKING`` imports are kept on purpose: they never run,
so they cannot deadlock an import, but a lower layer that names a higher layer's types is coupled
to it all the same (the type belongs lower). Relative imports are resolved; ``from pkg import
name`` is an edge to the submodule ``pkg.name`` when there is one, else to ``pkg`` (its
``__init__``). Importing ``a.b.c`` also runs the ``__init__`` of each package on the way that
the importer is not itself inside, so those are edges too (an empty ``__init__`` adds nothing).
Edges to modules outside attndsl are ignored.

Files are found through the import system's finders (``sys.meta_path``, without importing
anything), so the same code reads an editable install (where attndsl.codegen is the folder
codegen/), a wheel and a checkout on ``sys.path``.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import itertools
import os
import pkgutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

ROOT_PACKAGE = "attndsl"
# Subpackages that live in folders of their own (pyproject.toml's package-dir): scanned even if
# no module imported them. Others are found by listing the folders and following the imports.
SEEDS = ("attndsl.analysis", "attndsl.codegen", "attndsl.grammar")

# Every module's layer. An import may only go to the same or a lower layer. The layers, lowest
# first (the order of this dict; docs/architecture.md, "Layers"):
#   base -> ir -> front end -> semantics -> analysis -> codegen -> runtime -> api -> cli
#   base       no attndsl imports but errors: diagnostics, caches, names, the dump switch
#   ir         the operator registry, the typed IR, its limits, its printer and its meaning (the
#              interpreter, which the checker also uses to fold constants)
#   front end  source text -> checked IR (parser, checker and the helpers only they use)
#   semantics  the reference and what a call is: selectors, reference, inputs, bound patterns,
#              bound calls, the brute-force tile oracle
#   analysis   static block-sparsity analysis (attndsl.analysis.*)
#   codegen    the Triton backend's analyse, plan, generate, compile, launch and merge stages
#              (attndsl.codegen.*)
#   runtime    the backend pipeline of a call (bind, then a backend) and the torch backend
#   api        Program / Pattern and the package's __init__
#   cli        the command-line tool, what only it uses, and the ahead-of-time compile tool
# Entries are module names or fnmatch patterns ("attndsl.analysis.*"); an exact name wins over
# a pattern. Add a new module where it belongs; the test names every module missing here.
LAYERS: dict[str, tuple[str, ...]] = {
    "base": ("attndsl.errors", "attndsl.reserved", "attndsl.caches", "attndsl.dump"),
    "ir": ("attndsl.ops", "attndsl.ir", "attndsl.limits", "attndsl.printer", "attndsl.interp",
           "attndsl.derivative"),
    "front end": ("attndsl.parser", "attndsl.decls", "attndsl.checker", "attndsl.typing_rules",
                  "attndsl.constants", "attndsl.grammar", "attndsl.lexer"),
    "semantics": ("attndsl.selectors", "attndsl.reference", "attndsl.reference_grad",
                  "attndsl.inputs", "attndsl.expand", "attndsl.bound", "attndsl.call",
                  "attndsl.blocks"),
    "analysis": ("attndsl.analysis", "attndsl.analysis.*"),
    "codegen": ("attndsl.codegen", "attndsl.codegen.*"),
    "runtime": ("attndsl.runtime", "attndsl.torch_backend", "attndsl.torch_backward",
                "attndsl.torch_select", "attndsl.op", "attndsl.flex"),
    "api": ("attndsl.program", "attndsl", "attndsl.nn", "attndsl.hf"),
    "cli": ("attndsl.cli", "attndsl.cli_*", "attndsl.__main__", "attndsl.render",
            "attndsl.codegen.aot", "attndsl.codegen.aot_runner"),
}

MAX_CYCLES_SHOWN = 40


# ----------------------------------------------------------------------------- the graph builder


@dataclass(frozen=True)
class Site:
    """One import statement: where it is and what it says."""

    path: str
    line: int
    text: str
    via: str = ""          # for an edge to a package __init__: the module whose import runs it

    def __str__(self) -> str:
        note = f"  [runs the __init__ on the way to {self.via}]" if self.via else ""
        return f"{self.path}:{self.line}: {self.text}{note}"


def _find_spec(name: str, path):
    """The spec of ``name`` from the meta path finders, without importing anything."""
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find(name, path)
        except (ImportError, ValueError):
            continue
        if spec is not None:
            return spec
    return None


class ImportGraph:
    """The import graph of the package ``root``: nodes are module names, edges carry their
    import sites (``graph.edges[a, b]["sites"]``)."""

    def __init__(self, root: str, seeds: tuple[str, ...] = ()):
        self.root = root
        self.graph = nx.DiGraph()
        self.files: dict[str, Path] = {}
        self._specs: dict[str, object] = {}
        spec = self._locate(root)
        if spec is None:
            raise ModuleNotFoundError(f"no package {root} on sys.path")
        base = Path(spec.origin).resolve().parent.parent
        self._base = base
        todo = [root, *seeds]
        while todo:
            name = todo.pop()
            if name in self.files:
                continue
            spec = self._locate(name)
            if spec is None or not spec.origin or not spec.origin.endswith(".py"):
                continue
            self.files[name] = Path(spec.origin)
            self.graph.add_node(name)
            if spec.submodule_search_locations:
                todo += [f"{name}.{m.name}" for m in pkgutil.iter_modules(
                    list(spec.submodule_search_locations))]
            for target, site in self._imports(name, Path(spec.origin)):
                todo.append(target)
                if target != name:
                    self.graph.add_edge(name, target)
                    sites = self.graph.edges[name, target].setdefault("sites", [])
                    if site not in sites:          # `from .x import a, b`: one site
                        sites.append(site)
        # a target that turned out to be no file of the package (a typo, a dynamic name)
        self.graph.remove_nodes_from([n for n in list(self.graph) if n not in self.files])

    # -- locating modules

    def _locate(self, name: str):
        if name not in self._specs:
            parent, _, _ = name.rpartition(".")
            path = None
            if parent:
                pspec = self._locate(parent)
                path = list(pspec.submodule_search_locations or []) if pspec else []
            self._specs[name] = _find_spec(name, path) if path is None or path else None
        return self._specs[name]

    def _is_module(self, name: str) -> bool:
        return (name == self.root or name.startswith(self.root + ".")) and \
            self._locate(name) is not None

    def _display(self, path: Path) -> str:
        rel = os.path.relpath(path.resolve(), self._base)
        return path.as_posix() if rel.startswith("..") else Path(rel).as_posix()

    # -- reading imports

    def _imports(self, name: str, path: Path):
        """(target module, Site) for every import of the file that names a module of root."""
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        shown = self._display(path)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            text = " ".join(ast.unparse(node).split())
            text = text if len(text) <= 100 else text[:97] + "..."
            site = Site(shown, node.lineno, text)
            for target in self._targets(node, package):
                if not self._is_module(target):
                    continue
                yield target, site
                for ancestor in _ancestors(target):
                    if self._is_module(ancestor) and not _inside(name, ancestor):
                        yield ancestor, Site(shown, node.lineno, text, via=target)

    def _targets(self, node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if node.level:
            parts = package.split(".") if package else []
            if node.level - 1 > len(parts) - 1:
                return []                      # beyond the top-level package: not ours
            base = ".".join(parts[:len(parts) - (node.level - 1)])
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module or ""
        out = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            out.append(sub if alias.name != "*" and self._is_module(sub) else base)
        return out

    # -- reports

    def sites(self, a: str, b: str) -> list[Site]:
        return self.graph.edges[a, b]["sites"]

    def cycles(self, limit: int = 2000) -> list[list[str]]:
        """Simple cycles (each as its modules, the smallest name first), shortest first."""
        found = set()
        for comp in nx.strongly_connected_components(self.graph):
            sub = self.graph.subgraph(comp)
            if len(comp) == 1 and not sub.number_of_edges():
                continue
            for cyc in itertools.islice(nx.simple_cycles(sub), limit):
                i = cyc.index(min(cyc))
                found.add(tuple(cyc[i:] + cyc[:i]))
        return [list(c) for c in sorted(found, key=lambda c: (len(c), c))]

    def describe_cycle(self, cyc: list[str]) -> str:
        chain = cyc + cyc[:1]
        lines = [" -> ".join(chain)]
        for a, b in zip(chain, chain[1:]):
            lines += [f"    {a} -> {b}: {s}" for s in self.sites(a, b)]
        return "\n".join(lines)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer_of(module: str) -> str | None:
    """The layer LAYERS gives ``module``: its exact entry, else the first matching pattern."""
    for layer, names in LAYERS.items():
        if module in names:
            return layer
    for layer, names in LAYERS.items():
        if any(fnmatch.fnmatchcase(module, n) for n in names if any(c in n for c in "*?[")):
            return layer
    return None


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph(ROOT_PACKAGE, SEEDS)


# ----------------------------------------------------------------------------- attndsl


def test_the_graph_covers_the_package(graph):
    """Every module of the package is a node: the seeds, and each attndsl module loaded here."""
    import attndsl.cli  # noqa: F401  (the command-line tool imports the most)

    for name in (*SEEDS, "attndsl", "attndsl.program", "attndsl.cli", "attndsl.codegen.kernel",
                 "attndsl.analysis.api"):
        assert name in graph.files, name
    loaded = {n for n, m in list(sys.modules.items())
              if _inside(n, ROOT_PACKAGE) and (getattr(m, "__file__", "") or "").endswith(".py")}
    assert loaded <= set(graph.files), sorted(loaded - set(graph.files))
    assert graph.graph.has_edge("attndsl.cli", "attndsl.program")


def test_import_graph_is_acyclic(graph):
    cycles = graph.cycles()
    shown = "\n".join(graph.describe_cycle(c) for c in cycles[:MAX_CYCLES_SHOWN])
    more = f"\n... and {len(cycles) - MAX_CYCLES_SHOWN} more" if len(cycles) > MAX_CYCLES_SHOWN \
        else ""
    assert not cycles, f"{len(cycles)} import cycle(s) in {ROOT_PACKAGE}:\n{shown}{more}"


def test_layers(graph):
    order = list(LAYERS)
    missing = sorted(m for m in graph.files if layer_of(m) is None)
    assert not missing, "\n".join(f"assign {m} a layer in LAYERS" for m in missing)
    bad = []
    for a, b in sorted(graph.graph.edges):
        la, lb = layer_of(a), layer_of(b)
        if order.index(lb) > order.index(la):
            bad += [f"{a} ({la}) imports {b} ({lb}): {s}" for s in graph.sites(a, b)]
    assert not bad, (f"{len(bad)} import(s) go up the layers ({' -> '.join(order)}):\n"
                     + "\n".join(bad))


def test_layers_table_names_existing_modules(graph):
    names = [n for ns in LAYERS.values() for n in ns]
    assert len(names) == len(set(names)), "a name is in LAYERS twice"
    stale = [n for n in names if not any(c in n for c in "*?[") and n not in graph.files]
    assert not stale, f"LAYERS names modules that do not exist (remove them): {stale}"


# ----------------------------------------------------------------------------- the builder itself


def _package(tmp_path: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


def test_builder_reports_a_cycle_through_a_function_level_import(tmp_path, monkeypatch):
    _package(tmp_path, {
        "cyc/__init__.py": '"""A package with a cycle a -> b -> a (b imports a inside a function)."""\n',
        "cyc/a.py": """\
            import os

            from .b import helper
            """,
        "cyc/b.py": """\
            import json


            def helper():
                from . import a
                return a
            """,
        "cyc/sub/__init__.py": "",
        "cyc/sub/c.py": """\
            from typing import TYPE_CHECKING

            from .. import a, version
            from ..b import helper

            if TYPE_CHECKING:
                import cyc.sub.d
            """,
        "cyc/sub/d.py": "from cyc import *\nimport cyc.a as alias\n",
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    g = ImportGraph("cyc")
    assert set(g.files) == {"cyc", "cyc.a", "cyc.b", "cyc.sub", "cyc.sub.c", "cyc.sub.d"}
    assert "cyc" not in sys.modules                # located and parsed, never imported
    edges = set(g.graph.edges)
    assert edges == {("cyc.a", "cyc.b"), ("cyc.b", "cyc.a"),
                     ("cyc.sub.c", "cyc.a"), ("cyc.sub.c", "cyc"), ("cyc.sub.c", "cyc.b"),
                     ("cyc.sub.c", "cyc.sub.d"), ("cyc.sub.d", "cyc"), ("cyc.sub.d", "cyc.a")}
    assert g.cycles() == [["cyc.a", "cyc.b"]]
    text = g.describe_cycle(g.cycles()[0])
    assert text.splitlines()[0] == "cyc.a -> cyc.b -> cyc.a"
    assert "cyc/a.py:3: from .b import helper" in text
    assert "cyc/b.py:5: from . import a" in text          # the import inside the function
    # importing cyc.sub.c from outside cyc.sub runs cyc.sub's __init__ first
    _package(tmp_path, {"cyc/e.py": "import cyc.sub.c\n"})
    importlib.invalidate_caches()
    g = ImportGraph("cyc")
    assert g.graph.has_edge("cyc.e", "cyc.sub.c") and g.graph.has_edge("cyc.e", "cyc.sub")
    assert str(g.sites("cyc.e", "cyc.sub")[0]) == \
        "cyc/e.py:1: import cyc.sub.c  [runs the __init__ on the way to cyc.sub.c]"


def test_layer_lookup():
    assert layer_of("attndsl.analysis.api") == "analysis"
    assert layer_of("attndsl.codegen") == "codegen" and layer_of("attndsl.codegen.kernel") == "codegen"
    assert layer_of("attndsl") == "api" and layer_of("attndsl.cli_common") == "cli"
    assert layer_of("attndsl.no_such_module") is None
