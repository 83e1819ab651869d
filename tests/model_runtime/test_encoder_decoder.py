"""Encoder-decoder models (T5 and BART families): greedy float32 outputs equal
``model.generate`` on each source alone, whatever the batch around it, the
step budget, preemption or aborts, and no self or cross block leaks."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from batching.engine_core import EngineCore
from batching.errors import InvalidRequestError
from batching.sampling_params import SamplingParams
from model_runtime.loading.loader import load_model
from model_runtime.weights import layout as weight_layout
from model_runtime.weights.layout import FLOAT32_LAYOUTS
from server.engine_builder import EngineConfig, build_engine_core
from tests.model_runtime.test_parity import make_prompts, max_tokens_for, run_engine


def seq2seq_reference(model_dir: Path, sources: list[list[int]], max_tokens_of=max_tokens_for, **generation: object) -> list[list[int]]:
    """Greedy ``model.generate`` of each source alone, with the model's own
    generation config (its forced BOS included; no EOS, as ``ignore_eos``):
    the tokens after the decoder's prompt."""
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = model.generation_config
    num_forced = 1 if config.forced_bos_token_id is not None else 0
    outputs = []
    for index, source in enumerate(sources):
        settings = dict(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_tokens_of(index) + num_forced,
            eos_token_id=None,
            forced_eos_token_id=None,
            min_length=0,
            no_repeat_ngram_size=0,
        )
        settings.update(generation)
        with torch.inference_mode():
            generated = model.generate(torch.tensor([source]), attention_mask=torch.ones(1, len(source), dtype=torch.long), **settings)
        outputs.append(generated[0, 1 + num_forced :].tolist())
    return outputs


def build(loaded, **overrides) -> EngineCore:
    return build_engine_core(EngineConfig(model="unused", dtype="float32", device="cpu", **overrides), loaded)


@pytest.fixture(scope="module", params=["t5", "t5_relu_untied", "bart"])
def model_case(request: pytest.FixtureRequest):
    model_dir = request.getfixturevalue(f"tiny_{request.param}_dir")
    loaded = load_model(model_dir, dtype="float32", device="cpu")
    sources = make_prompts(seed=3, vocab_size=loaded.model.config.vocab_size)
    return model_dir, loaded, sources, seq2seq_reference(model_dir, sources)


@pytest.mark.parametrize("layout", FLOAT32_LAYOUTS)
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_parity_in_every_float32_layout(family: str, layout: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Whichever layout the load-time probe keeps: no forward runs at load for
    these models before unread weights are dropped, and T5's feed-forward
    reads ``wo.weight`` (its dtype) in every step."""
    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    monkeypatch.setattr(weight_layout, "fastest_overall", lambda times_s: layout)
    loaded = load_model(model_dir, dtype="float32", device="cpu")
    sources = make_prompts(seed=5, vocab_size=loaded.model.config.vocab_size)[:4]
    assert run_engine(build(loaded, num_kv_blocks=1024), sources) == seq2seq_reference(model_dir, sources)


def test_loads_as_an_encoder_decoder_model(model_case):
    """BART in particular loads whole, not as its decoder alone (BartForCausalLM)."""
    _, loaded, _, _ = model_case
    assert loaded.family in ("t5", "bart")
    assert loaded.model.config.is_encoder_decoder and hasattr(loaded.model, "get_encoder")


def test_parity_plain_batch(model_case):
    _, loaded, sources, expected = model_case
    core = build(loaded, num_kv_blocks=1024, max_num_batched_tokens=4096)
    assert run_engine(core, sources) == expected


def test_parity_small_step_budget(model_case):
    """Sources longer than the budget run alone in a step of their own."""
    _, loaded, sources, expected = model_case
    core = build(loaded, num_kv_blocks=1024, max_num_batched_tokens=40)
    assert run_engine(core, sources) == expected


def long_outputs(index: int) -> int:  # decoders that cross block boundaries
    return 20 + (index * 7) % 29


def test_parity_under_preemption(model_case):
    """Preempted requests give up self and cross blocks and re-encode on resume."""
    model_dir, loaded, sources, _ = model_case
    expected = seq2seq_reference(model_dir, sources, long_outputs)
    # 30 blocks of 16: the 300-token source (19 cross blocks) and its decoder fit alone, the batch does not.
    core = build(loaded, num_kv_blocks=30, max_num_batched_tokens=512)
    assert run_engine(core, sources, max_tokens_of=long_outputs) == expected
    assert core.scheduler.num_preemptions > 0


def test_aborts_mid_generation_leak_no_blocks(model_case):
    _, loaded, sources, expected = model_case
    core = build(loaded, num_kv_blocks=256, max_num_batched_tokens=256)
    tokens: dict[str, list[int]] = {}
    for index, source in enumerate(sources):
        request = core.make_request(f"a{index}", source, SamplingParams(max_tokens=max_tokens_for(index), temperature=0.0, ignore_eos=True))
        core.add_request(request)
        tokens[request.request_id] = []
    aborted = {f"a{index}" for index in range(0, len(sources), 3)}
    for step in range(10_000):
        if not core.has_unfinished:
            break
        if step == 3:
            for request_id in aborted:
                core.abort(request_id)
        for output in core.step():
            tokens[output.request_id].extend(output.new_token_ids)
    assert core.scheduler.block_manager.num_used_blocks == 0, "self or cross blocks leaked"
    for index in range(len(sources)):
        if f"a{index}" not in aborted:
            assert tokens[f"a{index}"] == expected[index]


@pytest.mark.parametrize("family", ["mbart", "marian"])
def test_parity_other_bart_family_members(family: str, request: pytest.FixtureRequest):
    """mBART (norm before each block) and Marian (sinusoidal positions, scaled embeddings)."""
    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    loaded = load_model(model_dir, dtype="float32", device="cpu")
    sources = make_prompts(seed=4, vocab_size=loaded.model.config.vocab_size)[:8]
    core = build(loaded, num_kv_blocks=512, max_num_batched_tokens=64)
    assert run_engine(core, sources) == seq2seq_reference(model_dir, sources)


def test_forced_eos_ends_at_max_tokens_as_generate_does(tiny_bart_dir: Path):
    """BART's generation config forces EOS as the last token: without
    ``ignore_eos`` the output equals ``generate``'s up to its EOS."""
    loaded = load_model(tiny_bart_dir, dtype="float32", device="cpu")
    sources = make_prompts(seed=5, vocab_size=loaded.model.config.vocab_size)[:6]
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_bart_dir, dtype=torch.float32).eval()
    core = build(loaded, num_kv_blocks=512)
    for index, source in enumerate(sources):
        with torch.inference_mode():
            generated = model.generate(torch.tensor([source]), do_sample=False, num_beams=1, max_new_tokens=9)[0, 2:].tolist()
        request = core.make_request(f"e{index}", source, SamplingParams(max_tokens=8, temperature=0.0))
        core.add_request(request)
        tokens = []
        while core.has_unfinished:
            for output in core.step():
                tokens += output.new_token_ids
        assert tokens == generated[: generated.index(2) + 1 if 2 in generated else None]
        assert tokens[-1] == 2  # EOS, forced at the latest as the 8th token


def test_parity_with_ngram_speculation(tiny_bart_dir: Path):
    """Drafts verified in the decoder step (a multi-token chunk with cross-attention); outputs stay greedy-exact."""
    loaded = load_model(tiny_bart_dir, dtype="float32", device="cpu")
    sources = make_prompts(seed=6, vocab_size=loaded.model.config.vocab_size)[:8]
    expected = seq2seq_reference(tiny_bart_dir, sources, long_outputs)
    core = build(loaded, num_kv_blocks=512, num_speculative_tokens=3)
    assert run_engine(core, sources, max_tokens_of=long_outputs) == expected
    assert core.scheduler.num_draft_tokens > 0 and core.scheduler.num_accepted_tokens > 0


def test_bad_requests_are_refused(tiny_t5_dir: Path):
    loaded = load_model(tiny_t5_dir, dtype="float32", device="cpu")
    core = build(loaded, num_kv_blocks=64, max_model_len=64)
    with pytest.raises(InvalidRequestError, match="encoder reads at most 64 tokens"):
        core.make_request("long", list(range(3, 70)), SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequestError, match="prompt logprobs"):
        core.make_request("plp", [5, 6], SamplingParams(max_tokens=4, prompt_logprobs=1))


def test_unsupported_models_are_refused(tmp_path: Path, default_model_dir: Path):
    """An encoder-decoder model of another family, or a model that is no causal LM, fails the load with a clear message."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM, ProphetNetConfig

    ProphetNetConfig(
        vocab_size=64,
        hidden_size=16,
        num_encoder_attention_heads=2,
        num_decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_encoder_layers=1,
        num_decoder_layers=1,
    ).save_pretrained(tmp_path / "prophetnet")
    with pytest.raises(ValueError, match="encoder-decoder model tokenstep does not serve"):
        load_model(tmp_path / "prophetnet", dtype="float32", device="cpu")
    # A masked LM (a bare DistilBertModel would be served as an embedder: tests/model_runtime/test_pooling.py).
    config = DistilBertConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    DistilBertForMaskedLM(config).save_pretrained(tmp_path / "distilbert")
    with pytest.raises(ValueError, match="not a causal LM"):
        load_model(tmp_path / "distilbert", dtype="float32", device="cpu")
