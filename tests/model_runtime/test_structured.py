"""Structured output through the engine: every constrained request's text
matches its grammar, and unconstrained requests in the same batch are untouched."""

import json
import re

import jsonschema
import pytest

from batching.engine_core import EngineCore
from batching.errors import InvalidRequestError
from batching.sampling_params import SamplingParams
from batching.structured import GuidedDecoding
from model_runtime.loading.loader import load_model
from server.engine_builder import EngineConfig, build_engine_core
from tests.model_runtime.test_parity import max_tokens_for, reference_outputs

NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "color", "address", "active"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(tiny_llama_dir, dtype="float32", device="cpu")


def build(loaded) -> EngineCore:
    config = EngineConfig(model="unused", dtype="float32", device="cpu", num_kv_blocks=2048, max_num_batched_tokens=2048)
    return build_engine_core(config, loaded)


def run(core: EngineCore, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, dict]:
    results = {}
    for request_id, (prompt, params) in requests.items():
        core.add_request(core.make_request(request_id, prompt, params))
        results[request_id] = {"text": "", "tokens": [], "finish_reason": None, "logprobs": []}
    while core.has_unfinished:
        for output in core.step():
            result = results[output.request_id]
            result["text"] += output.new_text
            result["tokens"] += output.new_token_ids
            result["logprobs"] += output.logprobs
            result["finish_reason"] = output.finish_reason
    assert core.scheduler.block_manager.num_used_blocks == 0, "blocks leaked"
    return results


def test_fifty_seeded_sampled_requests_all_validate(loaded):
    core = build(loaded)
    guided = GuidedDecoding.json_schema(NESTED_SCHEMA)
    requests = {
        f"r{seed}": ([1, 100 + seed, 200], SamplingParams(max_tokens=400, temperature=1.0, seed=seed, guided=guided)) for seed in range(50)
    }
    results = run(core, requests)
    for request_id, result in results.items():
        assert result["finish_reason"] == "stop", (request_id, result["text"])
        jsonschema.validate(json.loads(result["text"]), NESTED_SCHEMA)
    assert len({result["text"] for result in results.values()}) > 40, "seeds should give different objects"


def test_seeded_constrained_request_is_reproducible(loaded):
    guided = GuidedDecoding.json_schema(NESTED_SCHEMA)
    params = SamplingParams(max_tokens=400, temperature=1.0, seed=7, guided=guided)
    alone = run(build(loaded), {"a": ([5, 6, 7], params)})["a"]["text"]
    crowd = {f"x{i}": ([5, 6, 7], SamplingParams(max_tokens=20, temperature=1.0)) for i in range(6)}
    crowd["a"] = ([5, 6, 7], params)
    assert run(build(loaded), crowd)["a"]["text"] == alone


def test_choice_and_regex(loaded):
    choices = ["yes", "no", "maybe so"]
    requests = {
        f"c{seed}": ([3, seed + 10], SamplingParams(max_tokens=10, temperature=1.0, seed=seed, guided=GuidedDecoding.choice(choices)))
        for seed in range(20)
    }
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    requests |= {
        f"x{seed}": ([4, seed + 10], SamplingParams(max_tokens=20, temperature=1.0, seed=seed, guided=GuidedDecoding.regex(pattern)))
        for seed in range(20)
    }
    results = run(build(loaded), requests)
    for request_id, result in results.items():
        assert result["finish_reason"] == "stop"
        if request_id.startswith("c"):
            assert result["text"] in choices
        else:
            assert re.fullmatch(pattern, result["text"]), result["text"]
    assert len({results[f"c{seed}"]["text"] for seed in range(20)}) > 1


def test_greedy_constrained_logprobs_are_finite_and_unmasked(loaded):
    params = SamplingParams(max_tokens=10, temperature=0.0, logprobs=5, guided=GuidedDecoding.choice(["alpha", "beta"]))
    result = run(build(loaded), {"g": ([9, 9, 9], params)})["g"]
    assert result["text"] in ("alpha", "beta")
    assert len(result["logprobs"]) == len(result["tokens"])
    for item in result["logprobs"]:
        assert all(value > float("-inf") for _, value in item.top)
        assert len(item.top) == 5


def test_max_tokens_before_the_grammar_completes_is_length(loaded):
    params = SamplingParams(max_tokens=3, temperature=1.0, seed=1, guided=GuidedDecoding.json_schema(NESTED_SCHEMA))
    result = run(build(loaded), {"short": ([1, 2, 3], params)})["short"]
    assert result["finish_reason"] == "length"
    assert len(result["tokens"]) == 3


def test_unconstrained_requests_keep_greedy_parity_beside_constrained_ones(loaded, tiny_llama_dir):
    prompts = [[5 + i, 17, 300 + i] for i in range(6)]
    expected = reference_outputs(tiny_llama_dir, prompts)
    guided = GuidedDecoding.json_schema(NESTED_SCHEMA)
    requests = {
        f"free{i}": (prompt, SamplingParams(max_tokens=max_tokens_for(i), temperature=0.0, ignore_eos=True))
        for i, prompt in enumerate(prompts)
    }
    requests |= {
        f"json{i}": ([1, i + 40], SamplingParams(max_tokens=400, temperature=0.0 if i % 2 else 1.0, seed=i, guided=guided))
        for i in range(6)
    }
    results = run(build(loaded), requests)
    assert [results[f"free{i}"]["tokens"] for i in range(6)] == expected
    for i in range(6):
        jsonschema.validate(json.loads(results[f"json{i}"]["text"]), NESTED_SCHEMA)


@pytest.mark.parametrize(
    "guided, message",
    [
        (lambda: GuidedDecoding.json_schema({"type": "frobnicate"}), "frobnicate"),
        (lambda: GuidedDecoding.json_schema({"type": "string", "pattern": "(("}), "regex"),
        (lambda: GuidedDecoding.regex("[a-z"), "unclosed"),
        (lambda: GuidedDecoding.lark("start: missing_rule"), "missing_rule"),
    ],
)
def test_a_grammar_that_does_not_compile_is_rejected_with_its_reason(loaded, guided, message):
    core = build(loaded)
    with pytest.raises(InvalidRequestError) as caught:
        core.make_request("bad", [1, 2], SamplingParams(guided=guided()))
    assert message in str(caught.value)
    assert not core.has_unfinished


def test_listed_properties_close_an_object_unless_the_schema_says_otherwise():
    from batching.structured import closed_objects

    schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "properties": {"x": {"const": {"properties": 1}}}},
            "open": {"type": "object", "properties": {}, "additionalProperties": True},
        },
        "$defs": {"thing": {"properties": {"a": {}}}},
        "allOf": [{"properties": {"b": {"type": "object", "properties": {"c": {}}}}}],
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert closed["properties"]["properties"]["properties"]["x"] == {"const": {"properties": 1}}
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert closed["$defs"]["thing"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["allOf"][0], "allOf branches stay open"
    assert closed["allOf"][0]["properties"]["b"]["additionalProperties"] is False
    assert schema["properties"]["properties"].get("additionalProperties") is None, "the input is not modified"
