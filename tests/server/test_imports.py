"""Every server module imports on its own, in a fresh interpreter: no import
circle is left for the app factory to dodge (route modules depend on
``server.state``, never on ``server.app``)."""

import subprocess
import sys
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[2] / "server"
MODULES = sorted(f"server.{path.stem}" for path in SERVER.glob("*.py") if path.stem != "__init__")


def test_the_route_modules_are_all_here():
    assert {"server.chat", "server.completions", "server.responses", "server.models", "server.tokenize"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module):
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120, cwd=SERVER.parent)
    assert result.returncode == 0, result.stderr[-2000:]


def test_route_modules_do_not_import_the_app_factory():
    for name in ("chat", "completions", "responses", "models", "tokenize", "stats", "pages", "chat_prompt", "params", "choices", "sse"):
        source = (SERVER / f"{name}.py").read_text()
        assert "server.app" not in source, f"server/{name}.py imports server.app"
