"""Time and profile one engine decode step at several batch sizes.

    .venv/bin/python benchmarks/step_profile.py [--batch-sizes 1,16,64] [--context 128] [--prefill-tokens 112]

For each batch size: B requests with `--context`-token prompts are prefilled,
then decode steps are timed (median of 12) and one profiled with
torch.profiler; ops are grouped into matmuls, attention (KV gather + SDPA),
cache writes, sampling and the rest (norms, RoPE, activations, Python).
"""

import argparse
import dataclasses
import time
from collections import defaultdict

from torch.profiler import ProfilerActivity, profile

from batching.sampling_params import SamplingParams
from model_runtime.loading.default_model import default_gguf_file, default_model_dir
from model_runtime.loading.loader import load_model
from server.engine_builder import EngineConfig, build_engine_core

GROUPS = {
    "aten::mm": "matmul",
    "aten::addmm": "matmul",
    "aten::bmm": "matmul",
    "aten::linear": "matmul",
    "mkldnn::_linear_pointwise": "matmul",
    "mkl::_mkl_linear": "matmul",
    "tokenstep::int8_linear": "matmul",
    "tokenstep::int4_linear": "matmul",
    "tokenstep::int8_dequantize": "matmul",
    "tokenstep::int4_dequantize": "matmul",
    "tokenstep::int_linear": "matmul",
    "aten::index": "attention: KV gather",
    "aten::index_select": "attention: KV gather",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention: SDPA",
    "tokenstep::paged_decode_attention": "attention: decode kernel",
    "tokenstep::paged_attention_step": "attention: C++ op (cache write, decode kernel, prefill SDPA)",
    "tokenstep::write_kv_cache": "cache write",
    "aten::index_copy_": "cache write",
    "aten::argmax": "sampling",
    "aten::topk": "sampling",
    "aten::sort": "sampling",
    "aten::exponential_": "sampling",
}


def run(loaded, batch_size: int, context: int, prefill_tokens: int = 0, top_ops: int = 0, compile_forward: bool = False) -> None:
    """Time decode steps of ``batch_size`` requests; with ``prefill_tokens``,
    every timed step also carries a prefill chunk of that many tokens (as
    when new requests arrive under load)."""
    core = build_engine_core(
        EngineConfig(model="x", kv_cache_memory="1GiB", max_num_batched_tokens=1024, max_num_seqs=256, compile=compile_forward), loaded
    )
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for i in range(batch_size):
        core.add_request(core.make_request(f"r{i}", [1000 + (i * 7 + t) % 40000 for t in range(context)], params))
    while core.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.running):
        core.step()
    if prefill_tokens:
        # A new prompt of prefill_tokens tokens per step (the step budget
        # admits one at a time); max_tokens 1, so it leaves once prefilled.
        core.scheduler.config = dataclasses.replace(core.scheduler.config, max_num_batched_tokens=batch_size + prefill_tokens)
        one_token = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        for i in range(16):
            core.add_request(core.make_request(f"new{i}", [2000 + (i * 11 + t) % 40000 for t in range(prefill_tokens)], one_token))
    times = []
    for _ in range(12):
        start = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        core.step()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        totals[GROUPS.get(event.key, "other ops")] += event.self_cpu_time_total / 1000
    profiled = sum(totals.values())
    label = f" + {prefill_tokens} prefill tokens" if prefill_tokens else ""
    print(
        f"B={batch_size:3d}{label}: {step_s * 1000:6.1f} ms/step, {batch_size / step_s:6.1f} tok/s | "
        + ", ".join(f"{name} {ms / profiled:.0%}" for name, ms in sorted(totals.items(), key=lambda kv: -kv[1]))
    )
    if top_ops:
        others = sorted((e for e in prof.key_averages() if e.key not in GROUPS), key=lambda e: -e.self_cpu_time_total)[:top_ops]
        print("  other ops: " + ", ".join(f"{e.key} {e.count}x {e.self_cpu_time_total / 1000:.1f} ms" for e in others))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--quantization", default="none", choices=["none", "int8", "gguf"], help="gguf: the default model's shipped Q4_1/Q8_0 blocks"
    )
    parser.add_argument("--top-ops", type=int, default=0, help="also list the N costliest ops outside the named groups")
    parser.add_argument("--prefill-tokens", type=int, default=0, help="also carry a prefill chunk of this many tokens in every timed step")
    parser.add_argument(
        "--activations",
        default="float32",
        choices=["float32", "int16", "int8"],
        help="int16/int8: the quantized linears quantize their inputs too (serve --activations)",
    )
    parser.add_argument("--compile", action="store_true", help="compile the step forward whole (serve --compile)")
    args = parser.parse_args()
    loaded = load_model(default_model_dir(), args.dtype, "cpu", args.quantization, default_gguf_file(), args.activations)
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        run(loaded, batch_size, args.context, args.prefill_tokens, args.top_ops, args.compile)


if __name__ == "__main__":
    main()
