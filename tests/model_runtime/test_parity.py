"""The test that proves the batcher: greedy float32 outputs equal
``model.generate`` on each prompt alone, whatever the batch around it, the
chunk size, preemption or the prefix-cache state."""

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from batching.engine_core import EngineCore
from batching.sampling_params import SamplingParams
from model_runtime.loading.loader import load_model
from server.engine_builder import EngineConfig, build_engine_core

NUM_REQUESTS = 16
MAX_PROMPT_LEN = 300


def make_prompts(seed: int, vocab_size: int) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 2, 15, 16, 17, 33, MAX_PROMPT_LEN] + [rng.randint(1, MAX_PROMPT_LEN) for _ in range(NUM_REQUESTS - 7)]
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


def max_tokens_for(index: int) -> int:
    return 4 + (index * 5) % 13


def reference_outputs(
    model_dir: Path, prompts: list[list[int]], max_tokens_of=max_tokens_for, dtype: torch.dtype = torch.float32, **generation: float
) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    return generate_outputs(model, prompts, max_tokens_of, **generation)


def generate_outputs(
    model: torch.nn.Module, prompts: list[list[int]], max_tokens_of=max_tokens_for, **generation: float
) -> list[list[int]]:
    """Greedy ``model.generate`` of each prompt alone, past any end token (as
    ``run_engine``'s ``ignore_eos``): the parity reference. A ``None`` end
    token in the given config does not override the model's own, so the
    model's is cleared for the call."""
    outputs = []
    device = next(model.parameters()).device  # make gpu-check runs it on CUDA
    model_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        for index, prompt in enumerate(prompts):
            config = GenerationConfig(do_sample=False, max_new_tokens=max_tokens_of(index), eos_token_id=None, pad_token_id=0, **generation)
            with torch.inference_mode():
                generated = model.generate(
                    torch.tensor([prompt], device=device),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
                    generation_config=config,
                )
            outputs.append(generated[0, len(prompt) :].tolist())
    finally:
        model.generation_config.eos_token_id = model_eos
    return outputs


def run_engine(
    core: EngineCore, prompts: list[list[int]], id_prefix: str = "r", max_tokens_of=max_tokens_for, **sampling: float
) -> list[list[int]]:
    tokens: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=max_tokens_of(index), temperature=0.0, ignore_eos=True, **sampling)
        request = core.make_request(f"{id_prefix}{index}", prompt, params)
        core.add_request(request)
        tokens[request.request_id] = []
    for _ in range(10_000):
        if not core.has_unfinished:
            break
        for output in core.step():
            tokens[output.request_id].extend(output.new_token_ids)
    assert not core.has_unfinished
    assert core.scheduler.block_manager.num_used_blocks == 0, "blocks leaked"
    return [tokens[f"{id_prefix}{index}"] for index in range(len(prompts))]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_case(request: pytest.FixtureRequest):
    model_dir = request.getfixturevalue(f"tiny_{request.param}_dir")
    loaded = load_model(model_dir, dtype="float32", device="cpu")
    prompts = make_prompts(seed=1, vocab_size=loaded.model.config.vocab_size)
    return model_dir, loaded, prompts, reference_outputs(model_dir, prompts)


def build(loaded, **overrides) -> EngineCore:
    config = EngineConfig(model="unused", dtype="float32", device="cpu", **overrides)
    return build_engine_core(config, loaded)


def test_parity_plain_batch(model_case):
    _, loaded, prompts, expected = model_case
    core = build(loaded, num_kv_blocks=512, max_num_batched_tokens=4096)
    assert run_engine(core, prompts) == expected


def test_parity_chunked_prefill(model_case):
    _, loaded, prompts, expected = model_case
    core = build(loaded, num_kv_blocks=512, max_num_batched_tokens=37)
    assert run_engine(core, prompts) == expected


def test_parity_under_preemption(model_case):
    _, loaded, prompts, expected = model_case
    # 30 blocks of 16 = 480 tokens: the 316-token request fits alone, the batch does not.
    core = build(loaded, num_kv_blocks=30, max_num_batched_tokens=256)
    assert run_engine(core, prompts) == expected
    assert core.scheduler.num_preemptions > 0


def test_parity_with_prefix_cache_hits(model_case):
    _, loaded, prompts, expected = model_case
    core = build(loaded, num_kv_blocks=1024, max_num_batched_tokens=512, enable_prefix_caching=True)
    assert run_engine(core, prompts, "first") == expected
    hits_before = core.scheduler.num_prefix_hit_tokens
    assert run_engine(core, prompts, "second") == expected
    assert core.scheduler.num_prefix_hit_tokens > hits_before


def test_parity_with_repetition_penalty_under_preemption(model_case):
    """The runner keeps each request's penalty counts across steps, from the
    step deltas; after chunked prefill and preemption (the counts rebuilt on
    resume) greedy tokens still equal ``generate(repetition_penalty=...)``."""
    model_dir, loaded, prompts, _ = model_case
    expected = reference_outputs(model_dir, prompts, LONG, repetition_penalty=1.8)
    core = build(loaded, num_kv_blocks=30, max_num_batched_tokens=64)
    assert run_engine(core, prompts, "pen", LONG, repetition_penalty=1.8) == expected
    assert core.scheduler.num_preemptions > 0
    assert expected != reference_outputs(model_dir, prompts, LONG), "the penalty should change some outputs"


def test_parity_in_bfloat16_with_packed_linears(tiny_llama_dir):
    """bf16 on CPU runs its linears through oneDNN-packed weights where the CPU
    has native bf16; greedy tokens still equal ``generate`` in bf16."""
    from model_runtime.weights.layout import PackedLinear, has_native_bf16

    loaded = load_model(tiny_llama_dir, dtype="bfloat16", device="cpu")
    packed = [m for m in loaded.model.modules() if isinstance(m, PackedLinear)]
    assert bool(packed) == has_native_bf16()
    prompts = make_prompts(seed=2, vocab_size=loaded.model.config.vocab_size)[:8]
    expected = reference_outputs(tiny_llama_dir, prompts, dtype=torch.bfloat16)
    config = EngineConfig(model="unused", dtype="bfloat16", device="cpu", num_kv_blocks=512, max_num_batched_tokens=4096)
    assert run_engine(build_engine_core(config, loaded), prompts) == expected


def repetitive_prompts(seed: int, vocab_size: int) -> list[list[int]]:
    """Prompts that repeat a phrase, so n-gram lookup finds drafts in them."""
    rng = random.Random(seed)
    prompts = []
    for length in (1, 5, 20, 40, 70, 120, 200, 250):
        phrase = [rng.randrange(3, vocab_size) for _ in range(rng.randint(3, 9))]
        prompts.append((phrase * (length // len(phrase) + 1))[:length])
    return prompts


def test_parity_with_ngram_speculation(model_case):
    """Speculative decoding changes how many tokens a step yields, never which."""
    model_dir, loaded, prompts, expected = model_case
    core = build(loaded, num_kv_blocks=512, max_num_batched_tokens=256, num_speculative_tokens=4)
    assert run_engine(core, prompts) == expected
    repetitive = repetitive_prompts(seed=3, vocab_size=loaded.model.config.vocab_size)
    core = build(loaded, num_kv_blocks=512, max_num_batched_tokens=64, num_speculative_tokens=4)
    assert run_engine(core, repetitive, "rep", LONG) == reference_outputs(model_dir, repetitive, LONG)
    assert core.scheduler.num_accepted_tokens > 0, "the repeated phrases should have let some drafts through"
    assert core.scheduler.num_draft_tokens > core.scheduler.num_accepted_tokens


def LONG(index: int) -> int:  # noqa: N802 - a max_tokens_of function
    return 48


def test_parity_with_ngram_speculation_under_preemption(model_case):
    model_dir, loaded, _, _ = model_case
    repetitive = repetitive_prompts(seed=6, vocab_size=loaded.model.config.vocab_size)
    core = build(loaded, num_kv_blocks=36, max_num_batched_tokens=128, num_speculative_tokens=5)
    assert run_engine(core, repetitive, "pre", LONG) == reference_outputs(model_dir, repetitive, LONG)
    assert core.scheduler.num_preemptions > 0 and core.scheduler.num_accepted_tokens > 0


@pytest.fixture(scope="module", params=["self", "noisy", "other-architecture"])
def draft_case(request: pytest.FixtureRequest, model_case):
    """A draft model for the target of ``model_case``: the target itself (every
    draft accepted), a noisy copy (some accepted) or the other tiny model (a
    different architecture with the same vocabulary: few accepted)."""
    model_dir, _, _, _ = model_case
    target_kind = "llama" if "llama" in model_dir.name else "gpt2"
    draft_dirs = {
        "self": model_dir,
        "noisy": request.getfixturevalue(f"noisy_{target_kind}_dir"),
        "other-architecture": request.getfixturevalue("tiny_gpt2_dir" if target_kind == "llama" else "tiny_llama_dir"),
    }
    return request.param, load_model(draft_dirs[request.param], dtype="float32", device="cpu")


def test_parity_with_draft_model(model_case, draft_case):
    """Draft-model speculation changes how many tokens a step yields, never
    which: plain batch, chunked prefill, and the prefix cache's second pass."""
    _, loaded, prompts, expected = model_case
    kind, draft = draft_case
    core = build_engine_core(
        EngineConfig(model="unused", num_kv_blocks=512, max_num_batched_tokens=64, num_speculative_tokens=3), loaded, draft
    )
    assert run_engine(core, prompts, "first") == expected
    assert run_engine(core, prompts, "second") == expected
    scheduler = core.scheduler
    assert scheduler.num_prefix_hit_tokens > 0
    assert scheduler.num_draft_tokens > 0
    if kind == "self":
        assert scheduler.num_accepted_tokens == scheduler.num_draft_tokens, "a model agrees with itself on every greedy token"
    if kind == "noisy":
        assert 0 < scheduler.num_accepted_tokens < scheduler.num_draft_tokens, "a noisy copy should agree on some drafts, not all"


def test_parity_with_draft_model_under_preemption(model_case, noisy_llama_dir):
    model_dir, loaded, _, _ = model_case
    draft = load_model(noisy_llama_dir if "llama" in model_dir.name else model_dir, dtype="float32", device="cpu")
    repetitive = repetitive_prompts(seed=6, vocab_size=loaded.model.config.vocab_size)
    config = EngineConfig(model="unused", num_kv_blocks=36, max_num_batched_tokens=128, num_speculative_tokens=5)
    core = build_engine_core(config, loaded, draft)
    assert run_engine(core, repetitive, "pre", LONG) == reference_outputs(model_dir, repetitive, LONG)
    assert core.scheduler.num_preemptions > 0 and core.scheduler.num_accepted_tokens > 0


def test_draft_model_must_share_the_vocabulary(tiny_llama_dir):
    from transformers import GPT2TokenizerFast

    from server.engine_builder import check_draft_vocabulary

    loaded = load_model(tiny_llama_dir, dtype="float32", device="cpu")
    other_tokenizer = GPT2TokenizerFast.from_pretrained(tiny_llama_dir)
    other_tokenizer.add_tokens(["<an-extra-token>"])
    draft = load_model(tiny_llama_dir, dtype="float32", device="cpu")
    check_draft_vocabulary(draft, loaded, "same")
    draft.tokenizer = other_tokenizer
    with pytest.raises(ValueError, match="vocabulary differs"):
        check_draft_vocabulary(draft, loaded, "other")
    draft.tokenizer = loaded.tokenizer
    draft.vocab_size = loaded.vocab_size + 1
    with pytest.raises(ValueError, match="exceeds"):
        check_draft_vocabulary(draft, loaded, "bigger")


def test_cpu_step_budget_grows_with_the_running_requests_unless_given(tiny_llama_dir):
    """Defaults wired by the engine factory: on CPU 128 tokens or 8 per
    running request; an explicit --max-num-batched-tokens stays fixed; no
    draft model means n-gram speculation, 0 tokens unless asked."""
    from batching.scheduler_config import CPU_TOKEN_BUDGET, CPU_TOKENS_PER_RUNNING_REQUEST, DRAFT_MODEL_SPECULATIVE_TOKENS

    loaded = load_model(tiny_llama_dir, dtype="float32", device="cpu")
    default = build_engine_core(EngineConfig(model="unused", num_kv_blocks=64), loaded).scheduler.config
    assert (default.max_num_batched_tokens, default.tokens_per_running_request) == (CPU_TOKEN_BUDGET, CPU_TOKENS_PER_RUNNING_REQUEST)
    assert (default.num_speculative_tokens, default.speculative_method) == (0, "ngram")
    fixed = build_engine_core(EngineConfig(model="unused", num_kv_blocks=64, max_num_batched_tokens=300), loaded).scheduler.config
    assert (fixed.max_num_batched_tokens, fixed.tokens_per_running_request) == (300, 0)
    with_draft = build_engine_core(
        EngineConfig(model="unused", num_kv_blocks=64), loaded, load_model(tiny_llama_dir, dtype="float32", device="cpu")
    )
    assert (with_draft.scheduler.config.num_speculative_tokens, with_draft.scheduler.config.speculative_method) == (
        DRAFT_MODEL_SPECULATIVE_TOKENS,
        "draft_model",
    )


def test_resolve_defaults_sizes_the_kv_pool_and_the_window(tiny_llama_dir):
    """``resolve_defaults`` on CPU: the default pool is ``CPU_KV_CACHE_MEMORY``
    worth of blocks, a draft model pays for its own copy of each block, a
    given size wins, and the window is the smallest of flag, model and draft."""
    from batching.scheduler_config import CPU_KV_CACHE_MEMORY
    from model_runtime.kv_cache import parse_memory_size
    from model_runtime.runner import ModelRunner
    from server.engine_builder import resolve_defaults

    loaded = load_model(tiny_llama_dir, dtype="float32", device="cpu")
    draft = load_model(tiny_llama_dir, dtype="float32", device="cpu")
    per_block = ModelRunner.bytes_per_block(loaded, 16)
    plain = resolve_defaults(EngineConfig(model="unused"), loaded)
    assert plain.num_kv_blocks == parse_memory_size(CPU_KV_CACHE_MEMORY) // per_block
    assert plain.max_model_len == loaded.max_model_len
    assert resolve_defaults(EngineConfig(model="unused"), loaded, draft).num_kv_blocks == parse_memory_size(CPU_KV_CACHE_MEMORY) // (
        2 * per_block
    )
    assert resolve_defaults(EngineConfig(model="unused", kv_cache_memory="1MiB"), loaded).num_kv_blocks == 2**20 // per_block
    assert resolve_defaults(EngineConfig(model="unused", max_model_len=100), loaded).max_model_len == 100
    assert resolve_defaults(EngineConfig(model="unused", max_model_len=10**9), loaded).max_model_len == loaded.max_model_len
