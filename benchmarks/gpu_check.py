"""``make gpu-check``: the GPU path checked in one run, with no network
(issue 30). Run from the repository root.

On a machine with CUDA, in order, each step timed and reported:

1. the Triton kernel tests (tests/model_runtime/test_triton_attention.py),
   compiled for the GPU;
2. the parity matrix: every served architecture of the model zoo
   (tests/model_zoo.py), random weights built on the spot, in float32 on
   CUDA: greedy outputs through the engine (chunked prefills, preemption)
   equal ``model.generate`` on the same device;
3. a bfloat16 smoke run of a ~0.4B Qwen2-shaped model (random weights):
   every request finishes with finite logits, and how many greedy tokens
   agree with bfloat16 ``generate`` is printed;
4. the OpenAI SDK against ``tokenstep serve --device cuda`` (a completion,
   a streamed chat completion);
5. ``tokenstep bench`` on the ~0.4B model in bfloat16 at 1, 16 and 64 requests
   in flight (W2, W1 and W64 of docs/BENCHMARKS.md), printed as one table
   (``--skip-bench`` leaves it out).

Without CUDA it says so, runs step 1 in Triton's interpreter on the CPU,
and exits with its status: CI keeps the script honest (``make gpu-check``
runs in .ci/run).

What it needs beyond PyTorch, Triton and transformers (which a CUDA image
has): tokenstep's other dependencies and the OpenAI SDK as wheels, and a
tokenizer (the default model's), both in ``.whl/`` (transformers among them: the image's may be older than tokenstep's): ``make gpu-wheels``
fills it on a machine with the network; this script installs the wheels
into a scratch folder when their modules are missing.

Usage: python benchmarks/gpu_check.py [--out DIR] [--skip-bench]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
SITE = Path(tempfile.gettempdir()) / "tokenstep-gpu-site"
BENCH_LEVELS = ((1, 8, "W2"), (16, 64, "W1"), (64, 128, "W64"))  # (in flight, requests, name)
# Qwen2-0.5B's shape with the default model's 49,152-token vocabulary (its tokenizer serves it).
DEVICE = "cuda"  # "cpu" under --rehearse-on-cpu
QWEN2_SHAPE = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=49152,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "gpu-check-results")), help="results folder")
    parser.add_argument("--skip-bench", action="store_true", help="leave out tokenstep bench")
    parser.add_argument("--rehearse-on-cpu", action="store_true", help="run every step on the CPU (checks this script, not the GPU)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    install_missing_wheels()
    import torch

    global DEVICE
    cuda = torch.cuda.is_available()
    print(f"gpu-check: torch {torch.__version__}, " + (f"CUDA device {torch.cuda.get_device_name()}" if cuda else "no CUDA device"))
    results: list[tuple[str, bool, float, str]] = []
    run_step(results, "tokenstep, its server and the OpenAI SDK import", import_check)
    run_step(results, "Triton kernel tests" + ("" if cuda else " (interpreted on the CPU)"), kernel_tests)
    if not cuda and not args.rehearse_on_cpu:
        print("gpu-check: no CUDA here, so only the CPU-side checks ran")
        return report(results, args.out)
    DEVICE = "cuda" if cuda else "cpu"
    tokenizer_dir = find_tokenizer()
    work = Path(tempfile.mkdtemp(prefix="tokenstep-gpu-check-"))
    if cuda:
        run_step(results, "attention: Triton against gather + SDPA (bfloat16)", attention_timing)
    run_step(results, f"parity matrix, float32 on {DEVICE}", lambda: parity_matrix(work, tokenizer_dir))
    qwen_dir = build_qwen2(work / "qwen2-0.4b", tokenizer_dir)
    run_step(results, "bfloat16 smoke run (0.4B)", lambda: bfloat16_smoke(qwen_dir))
    run_step(results, f"OpenAI SDK against tokenstep serve --device {DEVICE}", lambda: sdk_check(qwen_dir, args.out))
    if not args.skip_bench:
        run_step(results, "tokenstep bench (0.4B, bfloat16)", lambda: bench(qwen_dir, args.out))
    return report(results, args.out)


def run_step(results: list, name: str, step) -> None:
    print(f"\n== {name}", flush=True)
    start = time.monotonic()
    try:
        detail, passed = step() or "", True
    except Exception as error:  # one failing step must not hide the others
        traceback.print_exc()
        detail, passed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}", False
    elapsed = time.monotonic() - start
    free_device_memory()  # for the next step, which may be a server in another process
    results.append((name, passed, elapsed, detail))
    print(f"== {name}: {'passed' if passed else 'FAILED'} in {elapsed:.1f} s {detail}", flush=True)


def free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def report(results: list, out: Path) -> int:
    print("\n| step | result | seconds | detail |\n|---|---|---|---|")
    for name, passed, elapsed, detail in results:
        print(f"| {name} | {'passed' if passed else 'FAILED'} | {elapsed:.1f} | {detail} |")
    (out / "gpu_check.json").write_text(json.dumps([dict(zip(("step", "passed", "seconds", "detail"), r)) for r in results], indent=1))
    return 0 if all(passed for _, passed, _, _ in results) else 1


def install_missing_wheels() -> None:
    """The carried wheels into a scratch site folder, where tokenstep's own
    dependencies are missing (a CUDA image holds torch, not fastapi)."""
    import importlib.util

    if importlib.util.find_spec("fastapi") is not None or not WHEELS.is_dir():
        return
    wheels = sorted(str(path) for path in WHEELS.glob("*.whl"))
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", str(SITE), *wheels]
    subprocess.run(command, check=True)
    sys.path.insert(0, str(SITE))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(SITE), os.environ.get("PYTHONPATH")]))


def find_tokenizer() -> Path:
    """The default model's tokenizer: carried in ``.whl/tokenizer``, or the converted default model."""
    if (WHEELS / "tokenizer").is_dir():
        return WHEELS / "tokenizer"
    from model_runtime.loading.default_model import default_model_dir

    return default_model_dir()


def import_check() -> str:
    """Every module a step below needs, imported in a fresh process (as the
    servers it starts are): a wheel missing from ``.whl/`` shows here first."""
    modules = "server.app, server.cli, bench.cli, openai, triton, tests.e2e.conftest, tests.model_zoo"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run([sys.executable, "-c", f"import {modules}"], cwd=ROOT, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise ImportError(completed.stderr.strip().splitlines()[-1])
    return modules


def kernel_tests() -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # The runner-level tests of that file run in make test (interpreted) and in the parity matrix (on CUDA).
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        "not runner",
        "tests/model_runtime/test_triton_attention.py",
    ]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    print(completed.stdout[-3000:] + completed.stderr[-2000:])
    if completed.returncode != 0:
        raise RuntimeError(f"pytest exited with {completed.returncode}")
    return completed.stdout.strip().splitlines()[-1]


def attention_timing() -> str:
    """One layer's attention (Qwen2-0.5B's heads: 14 over 2, head size 64) for
    a decode step of 64 rows at 1024 tokens of context and a fresh 2048-token
    prefill: tokenstep's Triton kernel against its fallback, gather + PyTorch
    SDPA (``attention.interface.attend``), timed with CUDA events; and, for
    the prefill, PyTorch's compiled flex attention with a causal block mask
    over the new keys (no cache to read: the least any paged kernel must do)."""
    print("| step | Triton ms | gather + SDPA ms | flex attention ms |\n|---|---|---|---|")
    for name, sequences in {"decode, 64 rows x 1024 context": [(1023, 1)] * 64, "prefill, 2048 new tokens": [(0, 2048)]}.items():
        triton_ms, sdpa_ms = _time_attention(sequences)
        flex = f"{_time_flex_prefill(sequences[0][1]):.3f}" if len(sequences) == 1 else "n/a"
        print(f"| {name} | {triton_ms:.3f} | {sdpa_ms:.3f} | {flex} |")
    return "table above"


def _time_flex_prefill(num_tokens: int) -> float:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    heads, kv_heads, head_dim = 14, 2, 64
    query = torch.randn(1, heads, num_tokens, head_dim, device="cuda", dtype=torch.bfloat16)
    keys, values = torch.randn(2, 1, kv_heads, num_tokens, head_dim, device="cuda", dtype=torch.bfloat16)
    mask = create_block_mask(lambda b, h, q, k: q >= k, None, None, num_tokens, num_tokens, device="cuda")
    compiled = torch.compile(flex_attention)
    return _cuda_ms(lambda: compiled(query, keys, values, block_mask=mask, enable_gqa=True, scale=head_dim**-0.5))


def _time_attention(sequences: list[tuple[int, int]]) -> tuple[float, float]:
    """Milliseconds of the Triton kernel and of ``attend`` over ``sequences`` ((cached, new) tokens each)."""
    import torch

    from model_runtime.attention import triton_paged
    from model_runtime.attention.context import SequenceChunk, build_step
    from model_runtime.attention.interface import LayerFeatures, attend

    heads, kv_heads, head_dim, block_size, blocks_each = 14, 2, 64, 16, 128
    cache = torch.randn(2, len(sequences) * blocks_each, block_size, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    chunks = [
        SequenceChunk([0] * new, cached, list(range(i * blocks_each, (i + 1) * blocks_each))) for i, (cached, new) in enumerate(sequences)
    ]
    _, _, context = build_step(chunks, [cache[0]], [cache[1]], torch.device("cuda"), with_mask=True, triton=True)
    num_tokens = sum(new for _, new in sequences)
    query = torch.randn(1, heads, num_tokens, head_dim, device="cuda", dtype=torch.bfloat16)
    new_kv = torch.randn(1, kv_heads, num_tokens, head_dim, device="cuda", dtype=torch.bfloat16)
    features = LayerFeatures(scale=head_dim**-0.5)

    def triton_layer() -> torch.Tensor:  # the cache write and the attention, as attend does both
        triton_paged.write_cache(new_kv[0], new_kv[0], cache[0], cache[1], context.triton.slot_mapping)
        return triton_paged.attention(query[0], cache[0], cache[1], context.triton, features.scale, None, None, None)

    triton_ms = _cuda_ms(triton_layer)
    sdpa_ms = _cuda_ms(lambda: attend(query, new_kv, new_kv, cache[0], cache[1], context, features))
    return triton_ms, sdpa_ms


def _cuda_ms(function, repeats: int = 20) -> float:
    import torch

    function()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def parity_matrix(work: Path, tokenizer_dir: Path) -> str:
    from model_runtime.loading.loader import load_model
    from tests.model_runtime.test_model_zoo import max_tokens_of, zoo_prompts
    from tests.model_runtime.test_parity import run_engine
    from tests.model_zoo import ZOO
    from tests.model_zoo import build as build_zoo_model

    failed = []
    names = [name for name, model in ZOO.items() if model.refused is None]
    for name in names:
        try:
            model_dir = build_zoo_model(name, work / name, tokenizer_dir)
            loaded = load_model(model_dir, dtype="float32", device=DEVICE)
            prompts = zoo_prompts()
            expected = generate_on_device(model_dir, prompts, max_tokens_of)
            core = build_on_device(loaded, num_kv_blocks=12, max_num_batched_tokens=37)
            got = run_engine(core, prompts, "squeezed", max_tokens_of)
            same = sum(a == b for a, b in zip(got, expected))
            print(f"  {name}: {same}/{len(prompts)} requests equal generate; attention {attention_path(core)}", flush=True)
            if same != len(prompts):
                failed.append(name)
        except Exception as error:
            print(f"  {name}: {type(error).__name__}: {error}", flush=True)
            failed.append(name)
    if failed:
        raise AssertionError(f"{len(failed)} of {len(names)} architectures differ or fail: {', '.join(failed)}")
    return f"{len(names)} architectures equal generate"


def generate_on_device(model_dir: Path, prompts: list[list[int]], max_tokens_of, dtype=None) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    from tests.model_runtime.test_parity import generate_outputs

    # The model's own eager attention: SDPA cannot soft-cap, and some transformers releases
    # (5.17) then leave Gemma 2's soft-capping out of generate's output.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32, attn_implementation="eager").to(DEVICE).eval()
    return generate_outputs(model, prompts, max_tokens_of)


def build_on_device(loaded, **overrides):
    from server.engine_builder import EngineConfig, build_engine_core

    config = EngineConfig(model="unused", dtype=str(loaded.model.dtype).removeprefix("torch."), device=DEVICE, **overrides)
    return build_engine_core(config, loaded)


def attention_path(core) -> str:
    runner = core.runner
    return "Triton" if runner.triton_attention else "gather + SDPA"


def build_qwen2(target: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN2_SHAPE)).to(torch.bfloat16).eval()
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(target)
    print(f"  built {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters at {target}")
    return target


def bfloat16_smoke(model_dir: Path) -> str:
    import random

    import torch

    from model_runtime.loading.loader import load_model
    from tests.model_runtime.test_parity import run_engine

    loaded = load_model(model_dir, dtype="bfloat16", device=DEVICE)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (1, 17, 64, 200, 513)]
    core = build_on_device(loaded, max_num_batched_tokens=256, kv_cache_memory="2GiB")
    got = run_engine(core, prompts, "bf16", lambda index: 16)
    expected = generate_on_device(model_dir, prompts, lambda index: 16, dtype=torch.bfloat16)
    agree = sum(next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), len(g)) for g, e in zip(got, expected))
    assert all(len(tokens) == 16 for tokens in got), "a request did not finish"
    agreeing = f"{agree}/{16 * len(prompts)} greedy tokens agree with bfloat16 generate before the first difference"
    return f"{agreeing}; attention {attention_path(core)}"


def sdk_check(model_dir: Path, out: Path) -> str:
    from openai import OpenAI

    from tests.e2e.conftest import ServerProcess

    args = [str(model_dir), "--device", DEVICE, "--served-model-name", "qwen2", "--kv-cache-memory", "2GiB"]
    server = ServerProcess(args, log_path=out / "serve_sdk.log")
    try:
        server.wait_ready()
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
        completion = client.completions.create(model="qwen2", prompt="The capital of France is", max_tokens=8, temperature=0)
        assert completion.usage.completion_tokens == 8, completion
        stream = client.chat.completions.create(
            model="qwen2", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, stream=True, temperature=0
        )
        chunks = [chunk for chunk in stream]
        assert chunks and chunks[-1].choices[0].finish_reason in ("length", "stop"), chunks[-1]
    finally:
        server.close()
    return f"completion and a streamed chat of {len(chunks)} chunks"


def bench(model_dir: Path, out: Path) -> str:
    from bench.cli import main as bench_main
    from tests.e2e.conftest import ServerProcess

    server = ServerProcess(
        [str(model_dir), "--device", DEVICE, "--served-model-name", "qwen2", "--max-num-seqs", "64"], log_path=out / "serve_bench.log"
    )
    rows = []
    try:
        server.wait_ready()
        rehearsal = DEVICE == "cpu"  # a few short requests: the script's own check
        for in_flight, requests, name in BENCH_LEVELS[:2] if rehearsal else BENCH_LEVELS:
            result = out / f"bench_{name}.json"
            requests, output_len = (2, 8) if rehearsal else (requests, 128)
            argv = ["--base-url", server.base_url, "--num-prompts", str(requests), "--max-concurrency", str(in_flight)]
            argv += ["--input-len", "128", "--output-len", str(output_len), "--ignore-eos", "--no-progress", "--result-json", str(result)]
            argv += ["--label", f"tokenstep {name}", "--max-duration", "120"]
            if bench_main(argv) != 0:
                raise RuntimeError(f"tokenstep bench {name} failed")
            rows.append((name, in_flight, json.loads(result.read_text())))
    finally:
        server.close()
    print("\n| run | in flight | output tok/s | TPOT p50 ms | TTFT p50 ms |\n|---|---|---|---|---|")
    for name, in_flight, data in rows:
        print(f"| {name} | {in_flight} | {data['output_throughput']:.1f} | {data['median_tpot_ms']:.2f} | {data['median_ttft_ms']:.1f} |")
    return "table above"


if __name__ == "__main__":
    sys.exit(main())
