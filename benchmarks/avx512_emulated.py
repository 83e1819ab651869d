"""Check the AVX-512 integer-activation and decode-attention kernels on a CPU without AVX-512.

    .venv/bin/python benchmarks/avx512_emulated.py

``model_runtime/kernels/int_gemm.cpp`` and ``paged_attention.cpp`` have one
path per instruction set, and a host runs only those its CPU has: on an
AVX2-only machine the AVX-512 paths are built but never run by the tests.
This compiles those sources once more with
SIMDe (SIMD Everywhere, the ``simde-py`` sdist on PyPI: portable C
implementations of the AVX-512 intrinsics) standing in for AVX-512 and VNNI,
and compares its outputs with the plain C++ build's on random weights and
rows, every bit width and activation width (attention: ragged contexts
over shuffled blocks, with and without a window, soft-cap and sinks). About a minute on 2 cores (SIMDe
at -O1). Run it after changing the kernels on a host without AVX-512.
"""

import ctypes
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_runtime import kernels  # noqa: E402
from model_runtime.weights.int_activations import pack_codes  # noqa: E402

SIMDE = "simde-py==0.8.2.post1"
SHIM = """#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define __AVX512F__ 1
#define __AVX512VNNI__ 1
// SIMDe 0.8.2 has no _mm512_reduce_add_ps (vec.h's hsum); a lane-by-lane sum stands in
static inline float ts_reduce_add(simde__m512 v) {{
    float lanes[16], sum = 0.f;
    simde_mm512_storeu_ps(lanes, v);
    for (int i = 0; i < 16; ++i) sum += lanes[i];
    return sum;
}}
#define _mm512_reduce_add_ps(v) ts_reduce_add(v)
#include "{source}"
"""
SOURCES = ("int_gemm.cpp", "paged_attention.cpp")


def build(work: Path) -> ctypes.CDLL:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(work), SIMDE], check=True)
    with tarfile.open(next(work.glob("simde_py-*.tar.gz"))) as sdist:
        sdist.extractall(work, filter="data")
    include = next(work.glob("simde_py-*/simde_py/simde"))
    shims = [work / f"shim_{source}" for source in SOURCES]
    for shim, source in zip(shims, SOURCES, strict=True):
        shim.write_text(SHIM.format(source=source))
    library = work / "libemulated.so"
    subprocess.run(
        ["c++", "-O1", "-std=gnu++20", "-fPIC", "-shared", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=fast", "-w", "-Wno-psabi",
         "-DTS_ISA=emulated", "-DTS_VEC=16", f"-I{include}", f"-I{kernels.SOURCE_DIR}", *map(str, shims), "-o", str(library)],
        check=True,
    )  # fmt: skip
    lib = ctypes.CDLL(str(library))
    pointer, integer = ctypes.c_void_p, ctypes.c_int64
    lib.ts_quantize_activations_emulated.argtypes = [pointer, integer, integer, integer, pointer, pointer, pointer, integer, integer]
    lib.ts_int_gemm_emulated.argtypes = [
        pointer, integer, pointer, pointer, integer, integer, pointer, integer,
        pointer, pointer, pointer, pointer, integer, integer, integer,
    ]  # fmt: skip
    real = ctypes.c_float
    lib.ts_paged_decode_emulated.argtypes = [
        pointer, integer, integer, pointer, pointer, integer, integer, integer, pointer, integer,
        pointer, integer, real, integer, real, pointer, pointer, integer, integer, pointer, integer, integer,
    ]  # fmt: skip
    return lib


def check_attention(lib: ctypes.CDLL, ops: object, generic: int) -> float:
    """The emulated decode attention against the generic build's: the largest relative difference."""
    worst = 0.0
    for heads, kv_heads, head_dim in ((9, 3, 64), (8, 2, 128), (4, 4, 16), (4, 1, 512)):
        lens = torch.tensor([1, 7, 8, 9, 16, 33, 100, 257])
        block_size, blocks = 16, int((lens + 15).div(16, rounding_mode="floor").sum()) + 2
        keys, values = torch.randn(2, blocks, block_size, kv_heads, head_dim).unbind(0)
        keys, values = keys.contiguous(), values.contiguous()
        width = int(lens.max() + 15) // 16
        order = torch.randperm(blocks)  # shuffled blocks (sequences may share some: only the values are compared)
        tables = torch.stack([order[(b * width + torch.arange(width)) % blocks] for b in range(len(lens))]).contiguous()
        query = torch.randn(len(lens), heads, head_dim)
        sinks = torch.randn(heads)
        for window, softcap, with_sinks in ((0, 0.0, False), (20, 0.0, False), (0, 5.0, True)):
            given_sinks = sinks if with_sinks else None
            want = ops.paged_decode_attention(query, keys, values, tables, lens, 0.2, generic, window, softcap, given_sinks)
            got = torch.zeros_like(want)
            lib.ts_paged_decode_emulated(
                query.data_ptr(), query.stride(0), query.stride(1), keys.data_ptr(), values.data_ptr(), block_size, kv_heads,
                head_dim, tables.data_ptr(), width, lens.data_ptr(), heads, 0.2, window, softcap,
                sinks.data_ptr() if with_sinks else None, got.data_ptr(), 0, 1, None, 0, len(lens) * kv_heads,
            )  # fmt: skip
            error = ((got - want).abs().max() / want.abs().max()).item()
            if error > 1e-5:
                sys.exit(f"AVX-512 (emulated) attention differs: {heads}/{kv_heads} heads of {head_dim}, window {window}: {error:.2e}")
            worst = max(worst, error)
    return worst


def emulated_linear(lib: ctypes.CDLL, x: torch.Tensor, codes, scales, offsets, bias, bits: int, act_bits: int, n: int) -> torch.Tensor:
    m, k = x.shape
    groups = codes.shape[1]
    xq = torch.zeros(m * groups * 32 * act_bits // 8, dtype=torch.uint8)
    dx, sx, y = torch.zeros(m, groups), torch.zeros(m, groups), torch.zeros(m, n)
    lib.ts_quantize_activations_emulated(x.data_ptr(), k, groups, act_bits, xq.data_ptr(), dx.data_ptr(), sx.data_ptr(), 0, m)
    lib.ts_int_gemm_emulated(
        xq.data_ptr(), act_bits, dx.data_ptr(), sx.data_ptr(), m, groups, codes.data_ptr(), bits, scales.data_ptr(),
        offsets.data_ptr(), bias.data_ptr(), y.data_ptr(), n, 0, codes.shape[0],
    )  # fmt: skip
    return y


def main() -> None:
    ops = kernels.load()
    generic = ops.isas().index("generic")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(tmp))
        worst = 0.0
        for bits, act_bits in ((4, 16), (5, 16), (8, 16), (4, 8), (8, 8)):
            for n, k in ((16, 32), (80, 96), (33, 64), (960, 576), (48, 1536)):
                packed = pack_codes(
                    torch.randint(0, 2**bits, (n, k), dtype=torch.uint8), torch.rand(n, -(-k // 32)) * 0.01,
                    torch.randn(n, -(-k // 32)) * 0.01, bits, act_bits,
                )  # fmt: skip
                bias = torch.randn(n)
                for rows in (1, 2, 3, 5, 8, 9, 17):
                    x = torch.randn(rows, k) * 3
                    want = ops.int_linear(x, *packed, bias, bits, act_bits, n, generic)
                    got = emulated_linear(lib, x, *packed, bias, bits, act_bits, n)
                    error = ((got - want).abs().max() / want.abs().max()).item()
                    worst = max(worst, error)
                    if error > 1e-5:
                        sys.exit(f"AVX-512 (emulated) differs: {bits}-bit codes, int{act_bits} activations, {rows}x{k}->{n}: {error:.2e}")
        attention = check_attention(lib, ops, generic)
    print(
        f"AVX-512 (emulated by SIMDe) gives the generic build's outputs; largest relative difference {worst:.1e} "
        f"(linears), {attention:.1e} (attention)"
    )


if __name__ == "__main__":
    main()
