"""llguidance vs xgrammar on this machine: compile time and per-step mask time.

    python benchmarks/grammar_compare.py            # needs both packages installed

Uses the default model's tokenizer (49152 tokens). A 20-field JSON schema is
compiled cold (fresh compiler, no cache; "compile" includes the first mask,
since llguidance builds its lexer lazily); then B matchers (16 or 64) walk the
tokens of a valid instance, and each step fills all B masks, as the batcher
does once per step. Results go to docs/STRUCTURED_OUTPUT.md by hand.
"""

import json
import statistics
import time

import torch
from transformers import AutoTokenizer

from model_runtime.loading.default_model import default_model_dir

FIELD_TYPES = [
    {"type": "string"},
    {"type": "integer", "minimum": 0},
    {"type": "number"},
    {"type": "boolean"},
    {"type": "string", "enum": ["red", "green", "blue"]},
    {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    {
        "type": "object",
        "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
        "required": ["x", "y"],
        "additionalProperties": False,
    },
]

SCHEMA = {
    "type": "object",
    "properties": {f"field_{i}": FIELD_TYPES[i % len(FIELD_TYPES)] for i in range(20)},
    "required": [f"field_{i}" for i in range(20)],
    "additionalProperties": False,
}

SAMPLE_VALUES = ["hello world", 42, 3.5, True, "green", ["a", "b"], {"x": 1, "y": 2}]
INSTANCE = {f"field_{i}": SAMPLE_VALUES[i % len(SAMPLE_VALUES)] for i in range(20)}


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def walk(batch: int, tokens: list[int], new_matcher, fill, consume, steps: int = 60) -> list[float]:
    """Per-step seconds to fill ``batch`` masks; rows start at staggered offsets."""
    matchers = [new_matcher() for _ in range(batch)]
    offsets = [(row * 7) % max(1, len(tokens) - steps) for row in range(batch)]
    for matcher, offset in zip(matchers, offsets):
        for token in tokens[:offset]:
            consume(matcher, token)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        fill(matchers)
        times.append(time.perf_counter() - start)
        for matcher, offset in zip(matchers, offsets):
            consume(matcher, tokens[offset + step])
    return times


def bench_llguidance(hf_tokenizer, tokens):
    import llguidance
    import llguidance.hf
    import llguidance.torch

    ll_tokenizer, tokenizer_s = timed(lambda: llguidance.hf.from_tokenizer(hf_tokenizer))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    first_mask = llguidance.torch.allocate_token_bitmask(1, ll_tokenizer.vocab_size)
    _, compile_s = timed(lambda: llguidance.torch.fill_next_token_bitmask(llguidance.LLMatcher(ll_tokenizer, grammar), first_mask, 0))
    executor = llguidance.LLExecutor(num_threads=2)
    results = {"tokenizer_s": tokenizer_s, "compile_s": compile_s}
    for batch in (16, 64):
        bitmask = llguidance.torch.allocate_token_bitmask(batch, ll_tokenizer.vocab_size)

        def fill_serial(matchers, bitmask=bitmask):  # what tokenstep's sampler does
            for i, m in enumerate(matchers):
                llguidance.torch.fill_next_token_bitmask(m, bitmask, i)

        def fill_parallel(matchers, bitmask=bitmask):
            llguidance.torch.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

        for name, fill in (("serial", fill_serial), ("par2", fill_parallel)):
            times = walk(batch, tokens, lambda: llguidance.LLMatcher(ll_tokenizer, grammar), fill, lambda m, t: m.consume_token(t))
            results[f"mask_ms_{batch}_{name}"] = 1000 * statistics.median(times)
            results[f"mask_max_ms_{batch}_{name}"] = 1000 * max(times)
    return results


def bench_xgrammar(hf_tokenizer, tokens):
    import xgrammar as xgr

    info, tokenizer_s = timed(lambda: xgr.TokenizerInfo.from_huggingface(hf_tokenizer))
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    first_mask = xgr.allocate_token_bitmask(1, info.vocab_size)

    def compile_and_first_mask():
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
        xgr.GrammarMatcher(compiled).fill_next_token_bitmask(first_mask, 0)
        return compiled

    compiled, compile_s = timed(compile_and_first_mask)
    results = {"tokenizer_s": tokenizer_s, "compile_s": compile_s}
    for batch in (16, 64):
        bitmask = xgr.allocate_token_bitmask(batch, info.vocab_size)

        def fill(matchers, bitmask=bitmask):
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(bitmask, i)

        times = walk(batch, tokens, lambda: xgr.GrammarMatcher(compiled), fill, lambda m, t: m.accept_token(t))
        results[f"mask_ms_{batch}_serial"] = 1000 * statistics.median(times)
        results[f"mask_max_ms_{batch}_serial"] = 1000 * max(times)
    return results


def main() -> None:
    torch.set_num_threads(2)
    hf_tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    tokens = hf_tokenizer.encode(json.dumps(INSTANCE), add_special_tokens=False)
    print(f"instance: {len(tokens)} tokens")
    for name, bench in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        results = bench(hf_tokenizer, tokens)
        print(name, {key: round(value, 3) for key, value in results.items()})


if __name__ == "__main__":
    main()
