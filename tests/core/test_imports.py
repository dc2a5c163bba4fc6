"""Imports run one way: integrations -> backends -> core, and no module imports
itself back through others, counting imports inside functions.

The graph is built with ``ast`` from the source files: every ``import`` and
``from ... import`` anywhere in a module, except under ``if TYPE_CHECKING:``
(annotations only, never executed). An edge goes to the module named (to
``pkg.sub`` for ``from pkg import sub`` when ``sub`` is a module); importing a
submodule's parent package implicitly is not counted, as in import-linter.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "bogc_core": ROOT / "bogc_core",
    "bogc_core.backends": ROOT / "backends",
    "bogc_core.integrations": ROOT / "integrations",
}



def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([pkg, *parts])
            if pkg == "bogc_core" and parts and parts[0] in ("backends", "integrations"):
                continue
            mods[name] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the three packages it imports."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rsplit(".", 1)[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base_parts = here.split(".")
                    base = ".".join(base_parts[: len(base_parts) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                ]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]], within: str | None = None) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    nodes = [n for n in graph if within is None or n == within or n.startswith(within + ".")]
    keep = set(nodes)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v] & keep:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in nodes:
        if v not in index:
            strong(v)
    return out


def _core_only(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    core = {m for m in graph if not m.startswith(("bogc_core.backends", "bogc_core.integrations"))}
    return {m: graph[m] & core for m in core}


def test_the_graph_sees_function_level_imports_and_skips_type_checking():
    graph = import_graph()
    # _types imports the diagnostics inside a method; _diagnostics imports
    # _types only under TYPE_CHECKING.
    assert "bogc_core._diagnostics" in graph["bogc_core._types"]
    assert "bogc_core._types" not in graph["bogc_core._diagnostics"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_core_is_acyclic():
    found = cycles(_core_only(import_graph()))
    assert not found, f"import cycles in bogc_core: {found}"


def test_core_never_imports_backends_or_integrations():
    upper = ("bogc_core.backends", "bogc_core.integrations")
    graph = import_graph()
    bad = {
        m: sorted(t for t in deps if t.startswith(upper))
        for m, deps in graph.items()
        if not m.startswith(upper) and any(t.startswith(upper) for t in deps)
    }
    assert not bad, f"the core imports upward: {bad}"


def test_stage_modules_import_downward_only():
    """Every stage module reaches the leaf _types without passing through the package."""
    graph = import_graph()
    for m, deps in graph.items():
        if m.startswith("bogc_core._"):
            assert "bogc_core" not in deps, f"{m} imports the package __init__"


def test_whole_repo_is_acyclic():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def _private_core(target: str) -> bool:
    """A private module of the core (``bogc_core._x``) or of the fast paths
    (``bogc_core.backends._x``): what only the package itself may import."""
    for pkg in ("bogc_core.backends.", "bogc_core."):
        if target.startswith(pkg):
            return target[len(pkg):].split(".", 1)[0].startswith("_")
    return False


def test_private_core_detection():
    assert _private_core("bogc_core._calibration")
    assert _private_core("bogc_core.backends._numba_kernel")
    assert not _private_core("bogc_core")
    assert not _private_core("bogc_core.errors")
    assert not _private_core("bogc_core.backends.torch_fused")
    assert not _private_core("bogc_core.integrations.torch._x")  # the integration's own module


def test_integrations_import_no_private_core_module():
    """Integrations use the core's public names only (``bogc_core.__all__``,
    ``bogc_core.errors``, the fast-path modules), counting imports inside functions."""
    graph = import_graph()
    assert "bogc_core.integrations.jax" in graph  # the scan sees the integrations
    bad = {
        m: sorted(t for t in deps if _private_core(t))
        for m, deps in graph.items()
        if m.startswith("bogc_core.integrations") and any(_private_core(t) for t in deps)
    }
    assert not bad, f"integrations import private core modules: {bad}"


def test_numba_is_imported_on_first_use_only(tmp_path):
    """Importing the core, the fast paths' protocol modules or the torch integration does
    not import numba (about a second of start-up): the compiled loops import it when a
    call first takes them."""
    import subprocess
    import sys

    import pytest

    pytest.importorskip("torch")
    code = ("import sys, bogc_core, bogc_core.backends.numpy_fused, bogc_core.backends.torch_fused, "
            "bogc_core.integrations.torch; print('numba' in sys.modules)")
    # Outside the checkout: there the source folder bogc_core/ would shadow the installed package.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
