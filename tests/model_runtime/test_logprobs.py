"""Logprobs through the engine equal a plain full forward's log_softmax."""

import torch
from transformers import AutoModelForCausalLM

from batching.sampling_params import SamplingParams
from model_runtime.loading.loader import load_model
from server.engine_builder import EngineConfig, build_engine_core


def test_prompt_and_sampled_logprobs_match_full_forward(tiny_llama_dir):
    prompt = list(range(100, 150))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = torch.log_softmax(model(torch.tensor([prompt])).logits[0], dim=-1)  # [50, vocab]

    loaded = load_model(tiny_llama_dir, dtype="float32", device="cpu")
    # A budget of 16 splits the 50-token prompt into four prefill chunks.
    core = build_engine_core(EngineConfig(model="unused", num_kv_blocks=64, max_num_batched_tokens=16), loaded)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=3)
    core.add_request(core.make_request("a", prompt, params))
    outputs = []
    while core.has_unfinished:
        outputs.extend(core.step())

    prompt_logprobs = outputs[0].prompt_logprobs
    assert [lp.token_id for lp in prompt_logprobs] == prompt[1:]
    expected = reference[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor([lp.logprob for lp in prompt_logprobs]), expected, atol=1e-4)
    assert all(len(lp.top) == 3 for lp in prompt_logprobs)
    assert all(output.prompt_logprobs is None for output in outputs[1:])

    first = outputs[0].logprobs[0]
    assert first.token_id == int(reference[-1].argmax())
    assert abs(first.logprob - float(reference[-1].max())) < 1e-4
    for output in outputs:
        (chosen,) = output.logprobs
        assert chosen.top[0][0] == chosen.token_id  # greedy picks its own top logprob
        assert len(chosen.top) == 2
