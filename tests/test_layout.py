"""The package layout: the public import paths work without warnings, and the module-level imports
between moe_parallel's own modules form no cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import moe_parallel

PACKAGE_DIR = Path(moe_parallel.__file__).resolve().parent


def test_compat_is_a_public_path_without_warning() -> None:
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "from moe_parallel.compat import MoE, MoECompatError\n"
        "from moe_parallel.integration import compat\n"
        "assert MoE is compat.MoE and MoECompatError is compat.MoECompatError\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE_DIR.parent)


def test_public_names_unchanged() -> None:
    from moe_parallel.core.layer import MoELayer

    assert moe_parallel.MoELayer is MoELayer
    for name in moe_parallel.__all__:
        assert getattr(moe_parallel, name) is not None


def _module_name(path: Path) -> tuple[str, bool]:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _module_level_imports(tree: ast.Module):
    """Import statements run when the module is imported: not inside functions or classes'
    methods, not under ``if TYPE_CHECKING:``."""

    def walk(nodes):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                yield from walk(node.orelse)
            else:
                yield from walk(ast.iter_child_nodes(node))

    yield from walk(tree.body)


def import_graph() -> dict[str, set[str]]:
    """Module-level import edges between moe_parallel's own modules (relative imports resolved)."""
    files = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        name, is_pkg = _module_name(path)
        files[name] = (path, is_pkg)
    modules = set(files)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_pkg) in files.items():
        package = name if is_pkg else name.rpartition(".")[0]
        for node in _module_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from pkg import sub` imports the submodule where one exists
                targets = [source]
                targets += [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a name: its module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == GREY:
                return stack[stack.index(nxt) :] + [nxt]
            if colour[nxt] == WHITE and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_sees_relative_imports() -> None:
    graph = import_graph()
    assert "moe_parallel.core.config" in graph["moe_parallel.core.layer"]
    assert "moe_parallel.integration.deepspeed" in graph["moe_parallel.integration.compat"]  # `from . import x`
    assert "moe_parallel.checkpoints.checkpoint" not in graph["moe_parallel.integration.deepspeed"]  # in a function


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    if cycle:
        print("import cycle: " + " -> ".join(cycle))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_find_cycle_reports_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
