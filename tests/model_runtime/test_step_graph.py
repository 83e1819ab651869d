"""The compiled step forward (``--compile``): the packed step metadata round
trip, and greedy parity with ``model.generate`` through one compiled graph
for every step shape (decode rows alone, chunked prefills, both mixed,
preemption)."""

import pytest
import torch

from model_runtime.attention.context import PrefillSpan, StepContext, decode_tables
from model_runtime.attention.metadata import pack, unpack
from tests.model_runtime.test_parity import build, make_prompts, reference_outputs, run_engine


def make_context(num_tokens: int, decode: list[tuple[list[int], int]], prefills: list[PrefillSpan], with_mask: bool) -> StepContext:
    tables, lens, mask = (None, None, None)
    if decode:
        tables, lens, mask = decode_tables(
            [blocks for blocks, _ in decode], [n for _, n in decode], 16, torch.device("cpu"), with_mask=with_mask
        )
    slots = torch.arange(100, 100 + num_tokens)
    return StepContext([], [], slots, len(decode), tables, lens, mask, prefills)


@pytest.mark.parametrize("with_mask", [False, True])
def test_pack_round_trip(with_mask):
    prefills = [PrefillSpan(2, 5, 0, torch.tensor([7])), PrefillSpan(7, 20, 16, torch.tensor([3, 4, 9]))]
    context = make_context(27, [([1, 2, 5], 40), ([6], 3)], prefills, with_mask)
    unpacked = unpack(pack(context))
    assert unpacked.slot_mapping.tolist() == context.slot_mapping.tolist()
    assert unpacked.num_decode_tokens == 2
    assert unpacked.decode_block_tables.tolist() == context.decode_block_tables.tolist()
    assert unpacked.decode_context_lens.tolist() == [40, 3]
    if with_mask:
        assert torch.equal(unpacked.decode_context_mask, context.decode_context_mask)
    else:
        assert unpacked.decode_context_mask is None
    assert [(s.start, s.num_new_tokens, s.num_computed_tokens, s.block_ids.tolist()) for s in unpacked.prefills] == [
        (2, 5, 0, [7]),
        (7, 20, 16, [3, 4, 9]),
    ]


def test_pack_round_trip_without_decode_rows_and_each_step_its_own():
    first = pack(make_context(4, [], [PrefillSpan(0, 4, 0, torch.tensor([2]))], False))
    second = pack(make_context(1, [([5], 9)], [], False))
    assert unpack(first).prefills[0].block_ids.tolist() == [2]
    assert unpack(first).num_decode_tokens == 0
    assert unpack(second).num_decode_tokens == 1 and unpack(second).prefills == []
    assert unpack(first).num_decode_tokens == 0  # not the other step's remembered view


@pytest.fixture(scope="module")
def compiled_case(tiny_llama_dir):
    from model_runtime.loading.loader import load_model

    loaded = load_model(tiny_llama_dir, dtype="float32", device="cpu")
    prompts = make_prompts(seed=3, vocab_size=loaded.model.config.vocab_size)
    return loaded, prompts, reference_outputs(tiny_llama_dir, prompts)


def test_compiled_parity_chunked_and_preempted(compiled_case):
    loaded, prompts, expected = compiled_case
    # A small budget chunks prompts and mixes them with decode rows; a small
    # pool preempts. Both engines share one compiled graph per shape class.
    core = build(loaded, num_kv_blocks=30, max_num_batched_tokens=48, compile=True)
    assert core.runner.compiled is not None
    assert run_engine(core, prompts) == expected
    assert core.scheduler.num_preemptions > 0
    plain = build(loaded, num_kv_blocks=512, max_num_batched_tokens=512, compile=True)
    assert run_engine(plain, prompts, id_prefix="p") == expected


def test_a_failed_compile_runs_eagerly(compiled_case, monkeypatch, caplog):
    loaded, prompts, expected = compiled_case

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr("model_runtime.decoder_only.warm_up", fail)
    core = build(loaded, num_kv_blocks=512, max_num_batched_tokens=512, compile=True)
    assert core.runner.compiled is None
    assert "running it eagerly instead: no C++ compiler" in caplog.text
    assert run_engine(core, prompts[:4]) == expected[:4]
