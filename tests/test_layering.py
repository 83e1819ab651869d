"""Layer purity, checked statically (STYLE.md, "For tokenstep" rule 1).

Every ``.py`` file under each package is parsed with ``ast`` (never imported),
and the top-level name of every module it imports is collected: ``import a.b``
and ``from a.b import c`` both give ``a``, wherever they sit: module top level,
inside functions, under ``if TYPE_CHECKING:`` or ``try:``. Literal
``importlib.import_module("a.b")`` and ``__import__("a")`` calls count too.
Relative imports (``from . import x``) stay inside the package and are ignored.

The rules:

- ``batching/`` never touches tensors or HTTP: no torch, no web stack.
- ``model_runtime/`` knows nothing of HTTP or asyncio.
- ``server/`` holds no tensors: no torch. It may reach ``model_runtime``
  lazily (the CLI loads the model), so only the direct torch import is banned.
- ``bench/`` (``tokenstep bench``) is an HTTP client: it imports none of the
  engine's packages, no torch and no web server stack.
- ``model_runtime/`` sees of ``batching`` only the plain step messages
  (``STEP_MESSAGE_MODULES``); the wiring that builds a scheduler, block
  manager and engine core around a runner is ``server/engine_builder.py``.
- No import circle inside a package, not even one held open by a lazy import.
"""

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

WEB_STACK = frozenset({"fastapi", "starlette", "sse_starlette", "uvicorn"})

# package folder -> top-level module names it must not import
FORBIDDEN_IMPORTS: dict[str, frozenset[str]] = {
    "batching": frozenset({"torch"}) | WEB_STACK,
    "model_runtime": frozenset({"asyncio"}) | WEB_STACK,
    "server": frozenset({"torch"}),
    # The load generator is a plain HTTP client: no tie to the server's code.
    "bench": frozenset({"torch", "batching", "model_runtime", "server"}) | WEB_STACK,
}

_DYNAMIC_IMPORT_CALLS = frozenset({"import_module", "__import__"})


@dataclass(frozen=True)
class ImportViolation:
    """One forbidden import: where it is and which top-level module it names."""

    filename: str
    lineno: int
    module: str

    def __str__(self) -> str:
        return f"{self.filename}:{self.lineno} imports {self.module}"


def _top_level(module_name: str) -> str:
    return module_name.split(".", 1)[0]


def _dynamic_import_target(call: ast.Call) -> str | None:
    """The literal module name of ``importlib.import_module("x")`` / ``__import__("x")``."""
    func = call.func
    func_name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if func_name not in _DYNAMIC_IMPORT_CALLS or not call.args:
        return None
    first_arg = call.args[0]
    if isinstance(first_arg, ast.Constant) and isinstance(first_arg.value, str):
        return first_arg.value
    return None


def imported_modules(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    """Every absolute import in ``source`` as ``(lineno, top-level module name)``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, _top_level(alias.name)) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found.append((node.lineno, _top_level(node.module)))
        elif isinstance(node, ast.Call):
            target = _dynamic_import_target(node)
            if target and not target.startswith("."):
                found.append((node.lineno, _top_level(target)))
    return sorted(found)


def imported_module_names(source: str, modules: frozenset[str]) -> list[tuple[int, str]]:
    """Every absolute import in ``source`` as ``(lineno, full dotted name)``;
    ``from a import b`` names ``a.b`` where that is one of ``modules``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.append((node.lineno, child if child in modules else node.module))
    return sorted(found)


def find_violations(source: str, forbidden: frozenset[str], filename: str = "<string>") -> list[ImportViolation]:
    """The imports in ``source`` whose top-level module is in ``forbidden``."""
    return [ImportViolation(filename, lineno, module) for lineno, module in imported_modules(source, filename) if module in forbidden]


def package_sources(package: str) -> list[Path]:
    """Every ``.py`` file under the package folder (empty if it has none yet)."""
    package_dir = REPO_ROOT / package
    if not package_dir.is_dir():
        return []
    return sorted(p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("package", sorted(FORBIDDEN_IMPORTS))
def test_package_imports_respect_its_layer(package: str) -> None:
    sources = package_sources(package)
    assert sources, f"{package}/ has no Python modules: the layer check would prove nothing"
    violations = [
        violation
        for path in sources
        for violation in find_violations(
            path.read_text(encoding="utf-8"),
            FORBIDDEN_IMPORTS[package],
            str(path.relative_to(REPO_ROOT)),
        )
    ]
    assert not violations, "layer violations:\n" + "\n".join(map(str, violations))


# batching modules whose types are the messages between the layers (and the
# engine configuration's choice lists, which model_runtime checks against).
STEP_MESSAGE_MODULES = frozenset(
    {"batching.messages", "batching.runner_state", "batching.sampling_params", "batching.pooling_params", "batching.engine_config"}
)
PACKAGES = ("batching", "model_runtime", "server", "bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the project it imports (anywhere in the file)."""
    paths = {module_name(path): path for package in PACKAGES for path in package_sources(package)}
    names = frozenset(paths)
    return {
        module: {name for _, name in imported_module_names(path.read_text(encoding="utf-8"), names) if name in names}
        for module, path in paths.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules in order, the first
    repeated at the end), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                return stack[stack.index(imported) :] + [imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_model_runtime_sees_only_the_step_messages_of_batching() -> None:
    graph = import_graph()
    reaching = {
        f"{module} imports {imported}"
        for module, imports in graph.items()
        if module.startswith("model_runtime")
        for imported in imports
        if imported.startswith("batching") and imported not in STEP_MESSAGE_MODULES
    }
    assert not reaching, "model_runtime reaches past the step messages:\n" + "\n".join(sorted(reaching))


def test_no_import_circle() -> None:
    assert (cycle := find_cycle(import_graph())) is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_finder_finds_a_planted_circle() -> None:
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    lazy = "def f():\n    from model_runtime import kernels\n"
    assert imported_module_names(lazy, frozenset({"model_runtime.kernels"})) == [(2, "model_runtime.kernels")]


# --- the checker itself: a violation planted in a synthetic source is caught ---

PLANTED_SOURCE = '''
"""A module that breaks every rule it can."""
import os
import torch.nn as nn
from fastapi import FastAPI
from . import sibling
from .sibling import helper
import torchvision


def lazy() -> None:
    import torch
    from starlette.responses import Response
    import importlib
    importlib.import_module("sse_starlette.sse")


def also_lazy() -> None:
    __import__("asyncio")
'''


def test_checker_catches_planted_violations() -> None:
    violations = find_violations(PLANTED_SOURCE, FORBIDDEN_IMPORTS["batching"], "planted.py")
    assert [(v.lineno, v.module) for v in violations] == [
        (4, "torch"),
        (5, "fastapi"),
        (12, "torch"),
        (13, "starlette"),
        (15, "sse_starlette"),
    ]
    assert str(violations[0]) == "planted.py:4 imports torch"


def test_checker_catches_a_bare_import_torch() -> None:
    assert find_violations("import torch\n", frozenset({"torch"})) == [ImportViolation("<string>", 1, "torch")]


def test_checker_ignores_relative_and_lookalike_imports() -> None:
    modules = {module for _, module in imported_modules(PLANTED_SOURCE)}
    assert "sibling" not in modules  # relative imports stay inside the package
    assert "torchvision" in modules  # a prefix of a forbidden name is a different module
    assert find_violations("import torchvision\nimport os\n", frozenset({"torch"})) == []
    assert find_violations(PLANTED_SOURCE, FORBIDDEN_IMPORTS["model_runtime"]) == [
        ImportViolation("<string>", 5, "fastapi"),
        ImportViolation("<string>", 13, "starlette"),
        ImportViolation("<string>", 15, "sse_starlette"),
        ImportViolation("<string>", 19, "asyncio"),
    ]


# ------------------------------------------------- transitive, at run time
#
# The static rules above see each file's own imports. These import every
# module of a package in a fresh interpreter and look at everything that got
# loaded, so a forbidden module pulled in through a third-party or sibling
# import is caught too. ``server.cli`` is the one wiring point allowed to
# reach ``model_runtime`` (inside the loader it builds, not at import), and
# ``server.engine_builder``, the wiring it calls, is left out: it is where
# both layers meet.

TRANSITIVE_RULES: dict[str, frozenset[str]] = {
    "batching": frozenset({"torch", "model_runtime", "server", "bench"}) | WEB_STACK,
    "model_runtime": frozenset({"server", "bench"}) | WEB_STACK,
    "server": frozenset({"torch", "model_runtime", "bench"}),
    "bench": frozenset({"torch", "batching", "model_runtime", "server"}) | WEB_STACK,
}

WIRING_MODULES = frozenset({"server.engine_builder"})

_LOADED_AFTER_IMPORTING = """
import importlib, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for module in pkgutil.walk_packages(package.__path__, sys.argv[1] + "."):
    if module.name not in sys.argv[2:]:
        importlib.import_module(module.name)
print(" ".join(sorted({name.split(".")[0] for name in sys.modules})))
"""


def loaded_top_level_modules(package: str) -> set[str]:
    """Top-level names in ``sys.modules`` after importing every module of ``package``."""
    result = subprocess.run(
        [sys.executable, "-c", _LOADED_AFTER_IMPORTING, package, *WIRING_MODULES],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return set(result.stdout.split())


@pytest.mark.parametrize("package", sorted(TRANSITIVE_RULES))
def test_no_forbidden_module_is_loaded_transitively(package):
    loaded = loaded_top_level_modules(package)
    assert package in loaded
    forbidden = sorted(loaded & (TRANSITIVE_RULES[package] - {package}))
    assert not forbidden, f"importing {package}/ loads {forbidden}"


def test_the_transitive_check_sees_what_a_package_pulls_in():
    """model_runtime really loads torch: the check above would see a leak."""
    assert "torch" in loaded_top_level_modules("model_runtime")
