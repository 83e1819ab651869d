"""The model-zoo parity matrix: every architecture of ``tests/model_zoo.py``
is either served exactly or refused at load with one line naming why.

Served: concurrent greedy outputs equal ``model.generate`` on each prompt
alone, for prompts well past the sliding window, chunked (a 37-token step
budget) and preempted (a 12-block pool), then again from the prefix cache.
The features each path must honour are also run through the compiled graph,
n-gram and draft-model speculation and int8 weights, on the architectures
that have them (sliding windows, soft-capping, sinks); and the load-time
check, in float32 and bfloat16, is shown to refuse each of them left out.
Refused: ``load_model`` raises ``UnsupportedModelError`` naming the feature.
"""

import logging
import random

import pytest
import transformers.utils.logging as hf_logging

from batching.errors import InvalidRequestError
from model_runtime.attention.check import UnsupportedModelError
from model_runtime.attention.interface import ATTENTION_NAME, SLOT_ATTRIBUTE, LayerFeatures
from model_runtime.loading.loader import load_model
from server.engine_builder import EngineConfig, build_engine_core, kv_window
from tests.model_runtime.test_parity import build, generate_outputs, reference_outputs, repetitive_prompts, run_engine
from tests.model_zoo import WINDOW, ZOO

SERVED = [name for name, model in ZOO.items() if model.refused is None]
REFUSED = [name for name, model in ZOO.items() if model.refused is not None]
PROMPT_LENGTHS = (1, 7, WINDOW - 1, WINDOW, WINDOW + 1, 2 * WINDOW, 90, 160)


def max_tokens_of(index: int) -> int:
    return 12 + (index * 5) % 13


def zoo_prompts(seed: int = 11) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("name", SERVED)
def test_served_exactly_chunked_preempted_and_from_the_prefix_cache(name: str, zoo_dir):
    model_dir = zoo_dir(name)
    loaded = load_model(model_dir, dtype="float32", device="cpu")
    prompts = zoo_prompts()
    expected = reference_outputs(model_dir, prompts, max_tokens_of)
    squeezed = build(loaded, num_kv_blocks=12, max_num_batched_tokens=37)
    assert run_engine(squeezed, prompts, "squeezed", max_tokens_of) == expected
    assert squeezed.scheduler.num_preemptions > 0
    cached = build(loaded, num_kv_blocks=256, max_num_batched_tokens=128, enable_prefix_caching=True)
    assert run_engine(cached, prompts, "first", max_tokens_of) == expected
    assert run_engine(cached, prompts, "second", max_tokens_of) == expected
    assert cached.scheduler.num_prefix_hit_tokens > 0


@pytest.mark.parametrize("name", REFUSED)
def test_refused_at_load_naming_the_feature(name: str, zoo_dir):
    with pytest.raises(UnsupportedModelError, match=ZOO[name].refused):
        load_model(zoo_dir(name), dtype="float32", device="cpu")


# The architectures whose attention has features beyond causal softmax.
FEATURED = ["mistral-sliding", "gemma2", "gpt-oss"]


@pytest.mark.parametrize("name", ["gemma2", "gpt-oss"])  # windows on both; soft-capping, sinks (each compile costs ~10 s)
def test_compiled_graph_honours_the_features(name: str, zoo_dir):
    model_dir = zoo_dir(name)
    loaded = load_model(model_dir, dtype="float32", device="cpu")
    prompts = zoo_prompts(seed=12)
    core = build(loaded, num_kv_blocks=14, max_num_batched_tokens=40, compile=True)
    assert core.runner.compiled is not None
    assert run_engine(core, prompts, "compiled", max_tokens_of) == reference_outputs(model_dir, prompts, max_tokens_of)
    assert core.scheduler.num_preemptions > 0


@pytest.mark.parametrize("name", ["mistral-sliding", "gemma2"])  # the tiny gpt-oss repeats nothing n-grams could find
def test_ngram_verification_honours_the_features(name: str, zoo_dir):
    model_dir = zoo_dir(name)
    loaded = load_model(model_dir, dtype="float32", device="cpu")
    prompts = repetitive_prompts(seed=3, vocab_size=loaded.model.config.vocab_size)
    core = build(loaded, num_kv_blocks=40, max_num_batched_tokens=64, num_speculative_tokens=4)
    assert run_engine(core, prompts, "ngram", max_tokens_of) == reference_outputs(model_dir, prompts, max_tokens_of)
    assert core.scheduler.num_draft_tokens > 0


@pytest.mark.parametrize("name", FEATURED)
def test_draft_model_verification_honours_the_features(name: str, zoo_dir):
    """The draft model (here the model itself: every draft is accepted)
    shares the block tables, and proposes past the window too."""
    model_dir = zoo_dir(name)
    loaded = load_model(model_dir, dtype="float32", device="cpu")
    prompts = zoo_prompts(seed=15)
    config = EngineConfig(model="unused", num_kv_blocks=40, max_num_batched_tokens=64, num_speculative_tokens=3)
    core = build_engine_core(config, loaded, load_model(model_dir, dtype="float32", device="cpu"))
    assert run_engine(core, prompts, "draft", max_tokens_of) == reference_outputs(model_dir, prompts, max_tokens_of)
    assert core.scheduler.num_accepted_tokens == core.scheduler.num_draft_tokens > 0


@pytest.mark.parametrize("name", FEATURED)
def test_int8_weights_keep_the_features(name: str, zoo_dir):
    """Quantized linears change the numbers, not the attention: the engine
    equals ``generate`` on the same int8 model run with its own eager attention."""
    model_dir = zoo_dir(name)
    loaded = load_model(model_dir, dtype="float32", device="cpu", quantization="int8")
    prompts = zoo_prompts(seed=13)
    loaded.model.set_attn_implementation("eager")
    try:
        expected = generate_outputs(loaded.model, prompts, max_tokens_of)
    finally:
        loaded.model.set_attn_implementation(ATTENTION_NAME)
    assert run_engine(build(loaded, num_kv_blocks=14, max_num_batched_tokens=37), prompts, "int8", max_tokens_of) == expected


@pytest.mark.parametrize(
    ("name", "kwarg", "dtype"),
    [
        ("mistral-sliding", "sliding_window", "float32"),
        ("gemma2", "softcap", "float32"),
        ("gpt-oss", "s_aux", "float32"),
        ("gpt-oss", "s_aux", "bfloat16"),
        ("gpt-oss", "sliding_window", "bfloat16"),
    ],
)
def test_the_load_check_refuses_a_feature_left_out(name: str, kwarg: str, dtype: str, zoo_dir, monkeypatch):
    """The load-time check is what stands between a model and wrong answers
    (and the only check of bfloat16, whose greedy text may differ from
    ``generate``'s by rounding): it passes the model as served, and refuses
    it where tokenstep's attention is made to drop one of its features."""
    model_dir = zoo_dir(name)
    assert load_model(model_dir, dtype=dtype, device="cpu").attention is not None
    from_kwargs = LayerFeatures.from_kwargs.__func__
    monkeypatch.setattr(
        LayerFeatures,
        "from_kwargs",
        classmethod(lambda cls, kwargs, *rest: from_kwargs(cls, {k: v for k, v in kwargs.items() if k != kwarg}, *rest)),
    )
    with pytest.raises(UnsupportedModelError, match="rows of logits differ"):
        load_model(model_dir, dtype=dtype, device="cpu")


def test_kv_shared_layers_read_the_cache_of_the_layer_they_share(zoo_dir):
    """Gemma 4's last layers are handed the keys and values of earlier ones:
    they hold no cache of their own (their parity is in the matrix above)."""
    loaded = load_model(zoo_dir("gemma4-kv-shared"), dtype="float32", device="cpu")
    shape = loaded.attention.cache_shape
    assert [layer.shares_kv_of for layer in shape.layers] == [None, None, 0, 1]
    assert [layer.head_dim for layer in shape.layers] == [16, 32, 16, 32]
    assert shape.bytes_per_token() == 2 * (16 + 16) * 4 + 2 * (32 + 32) * 4  # 2 KV heads of the first two layers, float32
    cache = build(loaded, num_kv_blocks=8).runner.kv_cache
    assert cache.key_caches[2] is cache.key_caches[0] and cache.value_caches[3] is cache.value_caches[1]


def test_a_model_that_slides_everywhere_serves_a_request_longer_than_its_pool(zoo_dir):
    """Mistral's window on every layer: a 300-token prompt and 40 more tokens
    run in a 6-block (96-token) pool, its blocks going back and coming round
    again as the window moves, and the tokens still equal ``generate``'s. A
    model with a full-attention layer (Gemma 3) needs them all: refused."""
    prompt = zoo_prompts()[-1] * 2  # 320 tokens
    sliding = zoo_dir("mistral-sliding")
    core = build(load_model(sliding, dtype="float32", device="cpu"), num_kv_blocks=6, max_num_batched_tokens=37)
    assert run_engine(core, [prompt], "long", lambda _: 40) == reference_outputs(sliding, [prompt], lambda _: 40)
    mixed = build(load_model(zoo_dir("gemma3"), dtype="float32", device="cpu"), num_kv_blocks=6, max_num_batched_tokens=37)
    with pytest.raises(InvalidRequestError, match="the whole cache holds 96"):
        run_engine(mixed, [prompt], "long", lambda _: 40)


def test_a_model_whose_layers_drop_the_kwargs_is_served_through_a_slot_and_not_compiled(zoo_dir, caplog):
    """Falcon's decoder layers call attention without the forward's kwargs:
    the step's context reaches it through the slot the load check installs
    (the matrix proves the tokens); --compile then runs eagerly, saying so."""
    loaded = load_model(zoo_dir("falcon"), dtype="float32", device="cpu")
    assert hasattr(loaded.model, SLOT_ATTRIBUTE)
    assert not hasattr(load_model(zoo_dir("llama"), dtype="float32", device="cpu").model, SLOT_ATTRIBUTE)
    with caplog.at_level("INFO"):
        core = build(loaded, num_kv_blocks=8, compile=True)
    assert core.runner.compiled is None and "running it eagerly" in caplog.text
    assert "compile eager (this model's decoder layers drop the forward's kwargs" in caplog.text  # the start line says why
    assert getattr(loaded.model, SLOT_ATTRIBUTE).context is None  # filled only during a forward


def test_a_draft_model_the_kernel_does_not_take_beside_a_target_it_does(zoo_dir):
    """The target's steps run in the C++ kernels; the draft model's head size
    (24) does not fit them: it mirrors those steps through the Python paths."""
    target, draft = (load_model(zoo_dir(name), dtype="float32", device="cpu") for name in ("llama", "llama-head-24"))
    prompts = zoo_prompts(seed=16)
    core = build_engine_core(
        EngineConfig(model="unused", num_kv_blocks=64, max_num_batched_tokens=64, num_speculative_tokens=3), target, draft
    )
    assert core.runner.decode_kernel and not core.runner.drafter.decode_kernel
    assert run_engine(core, prompts, "draft", max_tokens_of) == reference_outputs(zoo_dir("llama"), prompts, max_tokens_of)
    assert core.scheduler.num_draft_tokens > 0


def test_blocks_drop_only_where_the_model_and_its_draft_both_slide_everywhere(zoo_dir):
    sliding, mixed, full = (load_model(zoo_dir(name), dtype="float32", device="cpu") for name in ("mistral-sliding", "gemma3", "llama"))
    assert kv_window(sliding) == WINDOW and kv_window(sliding, sliding) == WINDOW
    assert kv_window(mixed) is None and kv_window(full) is None and kv_window(sliding, full) is None


@pytest.mark.parametrize(("window", "served"), [(WINDOW, False), (1024, True)])
def test_a_window_only_the_config_states_is_proven_or_refused(window: int, served: bool, zoo_dir, tmp_path):
    """A Llama whose config carries a sliding_window its attention never
    receives: generate's cache applies it, tokenstep would not, so a window
    shorter than the context is refused; one as long as the context (1024,
    as Phi-3.5-MoE's 131072 is) never bites and is served."""
    import json
    import shutil

    model_dir = tmp_path / "llama-stray-window"
    shutil.copytree(zoo_dir("llama"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"sliding_window": window}))
    if served:
        assert load_model(model_dir, dtype="float32", device="cpu").attention.kv_window is None
    else:
        with pytest.raises(UnsupportedModelError, match="sliding windows shrunk"):
            load_model(model_dir, dtype="float32", device="cpu")


def test_loading_a_model_logs_no_transformers_warning(zoo_dir, caplog, monkeypatch):
    """The load check's reference forward passes and reads the cache under the
    names this transformers gives them: an old name warned at every start."""
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    hf_logging.warning_once.cache_clear()
    with caplog.at_level("WARNING", logger="transformers"):
        load_model(zoo_dir("llama"), dtype="float32", device="cpu")
    assert [record.getMessage() for record in caplog.records if record.name.startswith("transformers")] == []
