"""What importing moe_parallel pulls in, and what setup.py declares for it.

- DeepSpeed is imported only by ``moe_parallel/integration/`` (of the library and the app), and only
  when a function that needs it runs: ``import moe_parallel`` and its models, checkpoints and
  planners leave it, the Hugging Face packages and the app's packages unloaded.
- ``moe_parallel.hf`` without its packages fails with the command that installs the ``[hf]`` extra.
- setup.py: the library's module-level imports are in ``install_requires``; ``moe_parallel.hf``'s in
  it or the ``hf`` extra; the app's (``launch/``) in those or the ``app`` extra.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import runpy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "moe_parallel"
INTEGRATION = LIBRARY / "integration"
APP = ROOT / "launch"

HF_PACKAGES = ("transformers", "safetensors", "tokenizers")
APP_PACKAGES = ("hydra", "omegaconf", "wandb", "sentencepiece", "matplotlib")
# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"hydra": "hydra-core", "yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn"}
LOCAL = {"moe_parallel", "launch", "tests", "benchmarks", "scripts"}


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _catches_import_error(node: ast.Try) -> bool:
    names = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
    return bool(names & {"ImportError", "ModuleNotFoundError", "(ImportError, ModuleNotFoundError)"})


@functools.cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def imports(path: Path, module_level_only: bool = False, skip_optional: bool = False) -> Iterator[tuple[int, str]]:
    """``(line, imported module)`` of every absolute import in ``path``, and of
    ``importlib.import_module("...")`` calls with a literal name. ``module_level_only``: those run when
    the module is imported (not in functions, not under ``if TYPE_CHECKING:``); ``skip_optional``: not
    those inside ``try: ... except ImportError``."""

    def walk(nodes: list[ast.AST]) -> Iterator[tuple[int, str]]:
        for node in nodes:
            if isinstance(node, ast.Import):
                yield from ((node.lineno, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0 and node.module:
                    yield node.lineno, node.module
            elif module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            elif module_level_only and isinstance(node, ast.If) and _is_type_checking(node):
                yield from walk(node.orelse)
            elif skip_optional and isinstance(node, ast.Try) and _catches_import_error(node):
                yield from walk(node.handlers + node.orelse + node.finalbody)
            else:
                if (
                    isinstance(node, ast.Call)
                    and ast.unparse(node.func).endswith("import_module")
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                ):
                    yield node.lineno, node.args[0].value
                yield from walk(list(ast.iter_child_nodes(node)))

    yield from walk(_parse(path).body)


def top_level(module: str) -> str:
    return module.partition(".")[0]


def python_files(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*.py"))


def importers(package: str, roots: tuple[Path, ...], **kwargs) -> list[str]:
    """``file:line`` of each import of ``package`` (or its submodules) under ``roots``."""
    return [
        f"{path.relative_to(ROOT)}:{line}"
        for path in python_files(*roots)
        for line, module in imports(path, **kwargs)
        if top_level(module) == package
    ]


def test_only_the_integration_package_imports_deepspeed() -> None:
    found = importers("deepspeed", (LIBRARY, APP))
    outside = [where for where in found if not (ROOT / where.partition(":")[0]).is_relative_to(INTEGRATION)]
    assert outside == [], f"DeepSpeed imported outside moe_parallel/integration/: {outside}"
    # The scan sees the integration package's own (lazy) imports: it would see others too.
    assert any(where.startswith("moe_parallel/integration/pipeline.py:") for where in found)
    assert any(where.startswith("moe_parallel/integration/deepspeed.py:") for where in found)


def test_the_import_scan_sees_lazy_guarded_and_dynamic_imports(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text(
        "import importlib\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import wandb\n"
        "try:\n    import apex\nexcept ImportError:\n    apex = None\n"
        "def f():\n    from deepspeed.pipe import LayerSpec\n    importlib.import_module('hydra.utils')\n"
    )
    assert sorted(m for _, m in imports(source)) == [
        "apex",
        "deepspeed.pipe",
        "hydra.utils",
        "importlib",
        "typing",
        "wandb",
    ]
    assert sorted(m for _, m in imports(source, module_level_only=True)) == ["apex", "importlib", "typing"]
    assert sorted(m for _, m in imports(source, module_level_only=True, skip_optional=True)) == ["importlib", "typing"]


def test_the_library_imports_no_app_package_and_hf_packages_only_in_hf() -> None:
    for package in APP_PACKAGES:
        assert importers(package, (LIBRARY,)) == [], f"moe_parallel imports {package}, an [app] package"
    hf_dir = LIBRARY / "hf"
    for package in HF_PACKAGES:
        found = importers(package, (LIBRARY,), module_level_only=True)
        outside = [where for where in found if not (ROOT / where.partition(":")[0]).is_relative_to(hf_dir)]
        assert outside == [], f"{package} imported when these modules are imported: {outside}"


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


# Imported in this order, one process; after each group, which watched packages are loaded.
LIBRARY_MODULES = [
    "moe_parallel",
    "moe_parallel.core",
    "moe_parallel.experts",
    "moe_parallel.models",
    "moe_parallel.checkpoints",
    "moe_parallel.checkpoints.checkpoint",
]
MORE_MODULES = [
    "moe_parallel.planning.plan",
    "moe_parallel.planning.model",
    "moe_parallel.planning.comm",
    "moe_parallel.planning.activations",
    "moe_parallel.training.metrics",
    "moe_parallel.hf",
    "moe_parallel.compat",
    "moe_parallel.integration.engine",
    "moe_parallel.integration.parallel",
    "moe_parallel.integration.pipeline",
]


def test_importing_the_library_loads_no_deepspeed_hf_or_app_package() -> None:
    watched = ("deepspeed", *HF_PACKAGES, *APP_PACKAGES)
    report = f"print(sorted(m for m in {watched!r} if m in sys.modules))\n"
    code = "import sys\n" + "".join(f"import {m}\n" for m in LIBRARY_MODULES) + report
    code += "".join(f"import {m}\n" for m in MORE_MODULES) + report
    result = _run(code)
    assert result.returncode == 0, result.stderr
    after_library, after_more = (eval(line) for line in result.stdout.strip().splitlines()[-2:])
    assert after_library == [], f"importing {LIBRARY_MODULES} loads {after_library}"
    # moe_parallel.hf may load its own packages (it does not today); DeepSpeed and the app's stay out.
    loaded = [m for m in after_more if m not in HF_PACKAGES]
    assert loaded == [], f"importing {MORE_MODULES} loads {loaded}"


def test_hf_without_its_packages_names_the_extra() -> None:
    result = _run("import sys\nsys.modules['transformers'] = None\nimport moe_parallel.hf.load\n")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and "transformers" in last, result.stderr
    assert "pip install 'moe_parallel[hf]'" in last, result.stderr


def _setup_kwargs(monkeypatch: pytest.MonkeyPatch) -> dict:
    captured: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    runpy.run_path(str(ROOT / "setup.py"))
    return captured


def _distribution(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert name is not None, requirement
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


def _third_party(paths: list[Path], **kwargs) -> dict[str, str]:
    """Distribution name -> one ``file:line`` importing it."""
    out: dict[str, str] = {}
    for path in paths:
        for line, module in imports(path, **kwargs):
            name = top_level(module)
            if name in sys.stdlib_module_names or name in LOCAL or name == "__future__":
                continue
            out.setdefault(_distribution(DISTRIBUTIONS.get(name, name)), f"{path.relative_to(ROOT)}:{line}")
    return out


def test_setup_declares_what_the_library_and_the_app_import(monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = _setup_kwargs(monkeypatch)
    extras = kwargs["extras_require"]
    library = {_distribution(r) for r in kwargs["install_requires"]}
    hf = library | {_distribution(r) for r in extras["hf"]}
    app = hf | {_distribution(r) for r in extras["app"]}
    assert {"torch", "deepspeed"} <= library
    assert not (library & {_distribution(DISTRIBUTIONS.get(p, p)) for p in (*HF_PACKAGES, *APP_PACKAGES)})

    hf_files = python_files(LIBRARY / "hf")
    core_files = [p for p in python_files(LIBRARY) if p not in hf_files]
    for files, declared, what in (
        (core_files, library, "install_requires"),
        (hf_files, hf, "install_requires or the hf extra"),
    ):
        needed = _third_party(files, module_level_only=True, skip_optional=True)
        missing = {d: where for d, where in needed.items() if d not in declared}
        assert missing == {}, f"imported at module level but not in {what}: {missing}"
    needed = _third_party(python_files(APP), skip_optional=True)
    missing = {d: where for d, where in needed.items() if d not in app}
    assert missing == {}, f"launch/ imports these, which setup.py's install_requires and hf/app extras lack: {missing}"


def test_the_makefile_installs_the_extras_the_app_and_tests_need() -> None:
    makefile = (ROOT / "Makefile").read_text()
    installs = re.findall(r"pip install -q -e \"\.\[([a-z,]+)\]\"", makefile)
    assert installs and {"hf", "app", "dev"} <= set(installs[0].split(","))
