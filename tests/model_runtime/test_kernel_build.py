"""The kernels build wherever pyproject says tokenstep runs.

The installed torch (the lowest of pyproject's range, which the Makefile
pins) builds and loads the kernels in every kernel test. Here ``ops.cpp``,
the one source that includes torch's headers, is compiled with the very
command ``kernels.build`` uses against the headers of the highest torch the
range allows, taken from its wheel: torch 2.14's need C++20, and a build with
the wrong standard would leave every server on slow PyTorch without a
failure anywhere else."""

import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from model_runtime import kernels

ROOT = Path(__file__).resolve().parents[2]


def torch_requirement() -> str:
    return re.search(r'^\s*"(torch[^"]*)",', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)


@pytest.fixture(scope="module")
def highest_torch_headers(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """(version, include paths) of the highest torch pyproject allows, from its wheel."""
    requirement = torch_requirement()
    work = tmp_path_factory.mktemp("torch-headers")
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:", "-d", str(work), requirement]
    subprocess.run(download, check=True, capture_output=True, timeout=600)
    (wheel,) = work.glob("torch-*.whl")
    version = wheel.name.split("-")[1]
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(work, [name for name in archive.namelist() if name.startswith("torch/include/")])
    wheel.unlink()
    include = work / "torch" / "include"
    return version, [str(include), str(include / "torch" / "csrc" / "api" / "include")]


def compile_ops(include_paths: list[str], *extra: str) -> subprocess.CompletedProcess:
    cxx = shutil.which(kernels.compiler())
    assert cxx is not None, "a C++ compiler is on every machine of this project"
    command = [*kernels.ops_compile_command(cxx, include_paths), *extra, "-fsyntax-only", str(kernels.SOURCE_DIR / "ops.cpp")]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_pyproject_allows_the_torch_the_makefile_installs():
    requirement = torch_requirement()
    lowest, ceiling = re.fullmatch(r"torch>=([\d.]+),<([\d.]+)", requirement).groups()
    installed = torch.__version__.split("+")[0]
    assert lowest == installed.rsplit(".", 1)[0] or lowest == installed, (requirement, installed)
    assert "TORCH_REQUIREMENT ?= torch==" + installed in (ROOT / "Makefile").read_text()
    assert tuple(map(int, installed.split(".")[:2])) < tuple(map(int, ceiling.split(".")))


def test_ops_compile_against_the_highest_torch_the_range_allows(highest_torch_headers):
    version, include_paths = highest_torch_headers
    ceiling = re.search(r"<([\d.]+)", torch_requirement()).group(1)
    major, minor = map(int, ceiling.split("."))
    assert version.startswith(f"{major}.{minor - 1}."), f"pip chose torch {version}, not the range's highest minor"
    result = compile_ops(include_paths)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_older_standard_fails_there_so_the_check_above_can_fail(highest_torch_headers):
    _, include_paths = highest_torch_headers
    result = compile_ops(include_paths, "-std=gnu++17")  # the later -std wins: what the build used before
    assert result.returncode != 0 and "C++20" in result.stderr


def test_a_background_load_builds_once_on_its_own_thread_while_the_caller_goes_on(monkeypatch):
    """A first start compiles the kernels (15-30 s) while it converts the default model, not after."""
    started, release, builds = threading.Event(), threading.Event(), []

    def slow_build() -> str:
        builds.append(threading.current_thread().name)
        started.set()
        release.wait(10)
        return "ops"

    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "_load_once", slow_build)
    kernels.load_in_background()
    assert started.wait(10) and not release.is_set()  # building, and this thread was not kept waiting
    threading.Timer(0.2, release.set).start()
    assert kernels.load() == "ops"  # waits for the build under way
    kernels.load_in_background()
    assert kernels.load() == "ops" and builds == ["tokenstep-kernels"]  # built once, on its own thread
