"""tokenstep's own CPU kernels: C++ compiled on this machine, loaded as torch ops.

``load()`` returns the ops (``torch.ops.tokenstep``) or None. The sources in
this folder are compiled once per (source, torch, compiler) into
``<cache dir>/kernels/<hash>/`` with the system C++ compiler (``$CXX`` or
``c++``), as plain ``-O3`` objects, one per instruction set (AVX-512, AVX2,
generic), so one build serves every CPU the image may land on; which one runs
is measured at load (see ``model_runtime.weights.quantization``). ``make venv`` builds
them ahead (``tokenstep prepare``); otherwise the first load
does (about 15 s with GCC 12 on 2 cores, one compiler per core). Where there is no compiler, or the build fails,
``load()`` logs why and returns None, and callers fall back to plain PyTorch.
"""

import hashlib
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from model_runtime.paths import cache_dir

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent
LIBRARY = "libtokenstep_kernels.so"
# (name, compiler flags, float lanes per vector, rows per micro-tile): MR x 4
# accumulators must fit the vector registers (32 zmm, 16 ymm or xmm).
ISAS = (
    ("avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c", "-mprefer-vector-width=512"], 16, 6),
    ("avx2", ["-mavx2", "-mfma", "-mf16c"], 8, 3),
    ("generic", [], 4, 3),
)
# Compiled once per instruction set above; ops.cpp binds them to torch ops.
PER_ISA_SOURCES = ("woq_gemm.cpp", "int_gemm.cpp", "paged_attention.cpp")
# The standard torch's own extensions build with (torch.utils.cpp_extension)
# across the range pyproject allows: torch 2.14's headers need C++20
# (std::strong_ordering in c10/util/intrusive_ptr.h).
CXX_STANDARD = "gnu++20"

_lock = threading.Lock()
_loaded: dict[str, object] = {}


def compiler() -> str:
    return os.environ.get("CXX") or "c++"


def build_key() -> str:
    digest = hashlib.sha256()
    for source in sorted([*SOURCE_DIR.glob("*.cpp"), *SOURCE_DIR.glob("*.h")]):
        digest.update(source.name.encode() + source.read_bytes())
    digest.update(torch.__version__.encode() + str(ISAS).encode() + CXX_STANDARD.encode() + compiler().encode())
    return digest.hexdigest()[:16]


def library_path() -> Path:
    return cache_dir() / "kernels" / build_key() / LIBRARY


def _run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed:\n{result.stderr[-2000:]}")


def common_flags() -> list[str]:
    return [f"-std={CXX_STANDARD}", "-fPIC", "-ffp-contract=fast", "-fno-math-errno"]


def ops_compile_command(cxx: str, torch_include_paths: list[str]) -> list[str]:
    """The compiler and flags for ops.cpp, the one source that includes
    torch's headers (those at ``torch_include_paths``), less input and output."""
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    includes = [f"-I{path}" for path in torch_include_paths] + [f"-I{sysconfig.get_paths()['include']}"]
    # -fopenmp: at::parallel_for is inline OpenMP; without the flag its
    # pragma is ignored and every op runs on one thread. It links against
    # torch's own libgomp, so the process keeps one OpenMP pool.
    # -ffp-contract=off: its elementwise ops (rms_norm, rotary) round each
    # product apart, as the model's own PyTorch code does.
    return [cxx, "-O2", *common_flags(), "-ffp-contract=off", "-fopenmp", abi, *includes]


def build(target: Path) -> Path:
    """Compile the kernels into ``target`` (atomically: a finished library or nothing)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    cxx = shutil.which(compiler())
    if cxx is None:
        raise RuntimeError(f"no C++ compiler ({compiler()!r} is not on PATH)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        work = Path(tmp)
        common = common_flags()
        compiles, objects = [], []
        for name, flags, lanes, rows in ISAS:
            defines = [f"-DTS_ISA={name}", f"-DTS_VEC={lanes}", f"-DTS_MR={rows}"]
            for source in PER_ISA_SOURCES:
                obj = work / f"{Path(source).stem}_{name}.o"
                compiles.append([cxx, "-O3", *common, *flags, *defines, "-c", str(SOURCE_DIR / source), "-o", str(obj)])
                objects.append(str(obj))
        ops = work / "ops.o"
        compiles.append([*ops_compile_command(cxx, include_paths()), "-c", str(SOURCE_DIR / "ops.cpp"), "-o", str(ops)])
        # One compiler per core: the objects are independent.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(lambda command: _run(command, work), compiles))
        libs = [arg for path in library_paths() for arg in (f"-L{path}", f"-Wl,-rpath,{path}")]
        built = work / LIBRARY
        _run([cxx, "-shared", "-o", str(built), str(ops), *objects, *libs, "-lc10", "-ltorch_cpu", "-l:libgomp.so.1"], work)
        os.replace(built, target)
    return target


def load() -> object | None:
    """``torch.ops.tokenstep`` with the kernels loaded (building them if needed), or None."""
    with _lock:
        if "ops" in _loaded:
            return _loaded["ops"]
        _loaded["ops"] = _load_once()
        return _loaded["ops"]


def load_in_background() -> None:
    """Start ``load()`` on its own thread, so that other first-start work
    (converting the default model) runs while the compilers do, which hold
    no GIL; a later ``load()`` waits for it. Nothing when already loaded."""
    with _lock:
        if "ops" in _loaded:
            return
    threading.Thread(target=load, name="tokenstep-kernels", daemon=True).start()


def disable() -> None:
    """Serve with plain PyTorch, leaving the kernels out (``--no-kernels``,
    ``TOKENSTEP_NO_KERNELS``); only before the first ``load()``."""
    with _lock:
        if _loaded.get("ops") is not None:
            raise RuntimeError("tokenstep's kernels are already loaded in this process")
        _loaded["ops"] = None
        _loaded["why"] = "disabled (--no-kernels)"
    logger.info("tokenstep kernels disabled: using plain PyTorch")


def _load_once() -> object | None:
    path = library_path()
    try:
        if not path.exists():
            logger.info("compiling tokenstep's CPU kernels into %s (once per build)", path.parent)
            build(path)
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as error:
        logger.warning("tokenstep's CPU kernels are unavailable, using plain PyTorch instead: %s", error)
        _loaded["why"] = f"unavailable ({str(error).splitlines()[0]})"
        return None
    return torch.ops.tokenstep


def describe(model: torch.nn.Module) -> str:
    """What the kernels are in this process, for the start line: the
    instruction set ``model``'s linears chose by measurement (attention takes
    the widest), or why there are none. Loads nothing."""
    if "ops" not in _loaded:
        return "not used (no path of this model calls them)"
    ops = _loaded["ops"]
    if ops is None:
        return f"off: {_loaded.get('why', 'unavailable')}, plain PyTorch"
    isas = ops.isas()
    chosen = next((isas[m.isa] for m in model.modules() if getattr(m, "ops", None) is ops and getattr(m, "isa", -1) >= 0), None)
    linears = f", linears {chosen} (measured at load)" if chosen else ""
    return f"C++ built for {'/'.join(isas)} on this CPU: attention {isas[0]}{linears}"
