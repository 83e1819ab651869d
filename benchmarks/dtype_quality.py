"""How much a dtype changes the default model's predictions, against float32.

    .venv/bin/python benchmarks/dtype_quality.py [--dtype bfloat16 | --quantization int8 [--float-lm-head]
        | --quantization gguf [--gguf-file FILE]] [--activations int16|int8]

Greedy-generates 48 tokens for each prompt in float32, then scores those same
sequences (prompt + generated) with the other dtype, teacher-forced, and
reports: the mean and max absolute difference of the generated tokens'
log-probabilities, how often both dtypes pick the same top-1 token, and at
which position the other dtype's own greedy output first departs.
"""

import argparse
import statistics
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from model_runtime import kernels
from model_runtime.loading.default_model import default_gguf_file, default_model_dir
from model_runtime.weights.gguf import load_gguf_linears
from model_runtime.weights.int_activations import quantize_activations
from model_runtime.weights.quantization import choose_groupwise_kernels, quantize_int8

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "List three uses of copper.",
    "def fibonacci(n):",
    "Translate 'good morning' into Spanish.",
    "What causes the seasons on Earth?",
    "Give me a recipe for pancakes.",
    "Summarise the plot of Romeo and Juliet.",
    "Why is the sky blue?",
    "Name the planets of the solar system.",
    "How do vaccines work?",
]
NEW_TOKENS = 48


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--quantization",
        choices=["int8", "gguf"],
        help=(
            "float32 activations with tokenstep's weight-only int8 linears (model_runtime/weights/quantization.py), or "
            "the shipped GGUF's own Q4_1/Q8_0 blocks, instead of --dtype"
        ),
    )
    parser.add_argument("--float-lm-head", action="store_true", help="with --quantization int8: keep the LM head float32")
    parser.add_argument(
        "--activations",
        choices=["float32", "int16", "int8"],
        default="float32",
        help="int16/int8: the quantized linears quantize their inputs too (serve --activations)",
    )
    parser.add_argument(
        "--gguf-file",
        type=Path,
        help="with --quantization gguf: this GGUF file's blocks against its float32 dequantization (default: the shipped file)",
    )
    args = parser.parse_args()
    path, from_file = default_model_dir(), {}
    if args.gguf_file:
        path, from_file = args.gguf_file.parent, {"gguf_file": args.gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(path, **from_file)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **from_file).eval()
    if args.quantization:
        other = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **from_file).eval()
        if args.quantization == "gguf":
            load_gguf_linears(other, args.gguf_file or default_gguf_file())
            args.dtype = f"the blocks of {(args.gguf_file or default_gguf_file()).name}"
        else:
            quantize_int8(other, include_lm_head=not args.float_lm_head)
            args.dtype = "int8 weights" + (" (float32 LM head)" if args.float_lm_head else "")
        if args.activations != "float32":
            assert quantize_activations(other, kernels.load(), args.activations), "integer activations need tokenstep's kernels"
            args.dtype += f", {args.activations} activations"
        choose_groupwise_kernels(other, kernels.load())  # as the loader does, for the linears left float-activated
    else:
        other = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    diffs, agree, departures = [], [], []
    for prompt in PROMPTS:
        ids = chat_ids(tokenizer, prompt)
        n = ids.shape[1]
        full = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
        ref_logprobs = torch.log_softmax(reference(full).logits[0, n - 1 : -1].float(), -1)
        oth_logprobs = torch.log_softmax(other(full).logits[0, n - 1 : -1].float(), -1)
        targets = full[0, n:]
        chosen_ref = ref_logprobs.gather(1, targets[:, None])[:, 0]
        chosen_oth = oth_logprobs.gather(1, targets[:, None])[:, 0]
        diffs.extend((chosen_ref - chosen_oth).abs().tolist())
        agree.extend((ref_logprobs.argmax(-1) == oth_logprobs.argmax(-1)).tolist())
        own = other.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)[0, n:]
        same = (own == targets).tolist()
        departures.append(same.index(False) if False in same else NEW_TOKENS)
    print(f"{args.dtype} vs float32 over {len(PROMPTS)} prompts x {NEW_TOKENS} tokens:")
    print(
        f"  |delta logprob| of the float32 greedy tokens: mean {statistics.mean(diffs):.4f}, median "
        f"{statistics.median(diffs):.4f}, max {max(diffs):.3f}"
    )
    print(f"  top-1 agreement (teacher-forced): {sum(agree) / len(agree):.1%}")
    print(
        f"  greedy outputs identical for {sum(d == NEW_TOKENS for d in departures)}/{len(PROMPTS)} prompts; "
        f"first departure at token {sorted(departures)}"
    )


if __name__ == "__main__":
    main()
