"""``batching.views``: what ``/stats`` and the dashboard read of the engine."""

from batching.sampling_params import SamplingParams
from tests.fake_engine import fake_batcher


def test_view_says_prefill_until_a_request_has_computed_all_but_its_last_token():
    """A long prompt chunked over steps is "prefill", then "decoding"; the queue is "waiting"."""
    batcher = fake_batcher()  # a step budget of 64 tokens
    core = batcher.core
    for request_id in ("long", "queued"):
        core.add_request(core.make_request(request_id, [ord("a")] * 100, SamplingParams(max_tokens=4)))
    core.step()
    states = {row.request_id: row.state for row in batcher.view().requests}
    assert states == {"long": "prefill", "queued": "waiting"}
    core.step()
    assert {row.request_id: row.state for row in batcher.view().requests}["long"] == "decoding"
