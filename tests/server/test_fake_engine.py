"""HTTP behaviour over the fake engine (``tests/fake_engine.py``): the real
routes, batcher and scheduler, a scripted runner instead of a model. Fast,
and exact: the reply is known character by character."""

import json

from server.app import create_app
from server.settings import Settings
from server.state import Served
from tests.fake_engine import MAX_MODEL_LEN, REPLY, CharTokenizer, ScriptedRunner, fake_batcher
from tests.server.conftest import running

MODEL = "fake"


def fake_app(runner: ScriptedRunner | None = None):
    served = Served(fake_batcher(runner), CharTokenizer(), MODEL, MAX_MODEL_LEN)
    return create_app(Settings(api_key=None), ready=served)


def sse_payloads(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


async def test_completion_json_and_stream_carry_the_scripted_reply():
    async with running(fake_app()) as client:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 7}
        response = await client.post("/v1/completions", json=body)
        data = response.json()
        assert data["choices"][0]["text"] == REPLY[:7] and data["choices"][0]["finish_reason"] == "length"
        assert data["usage"] == {"prompt_tokens": 2, "completion_tokens": 7, "total_tokens": 9}
        assert response.headers["x-request-id"] == data["id"]
        streamed = await client.post("/v1/completions", json={**body, "stream": True})
        payloads = sse_payloads(streamed.text)
        assert payloads[-1] == "[DONE]"
        assert "".join(json.loads(p)["choices"][0]["text"] for p in payloads[:-1]) == REPLY[:7]


async def test_eos_stop_strings_and_n_on_the_wire():
    async with running(fake_app()) as client:
        whole = (await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 100})).json()["choices"][0]
        assert whole["text"] == REPLY and whole["finish_reason"] == "stop" and whole["stop_reason"] is None
        cut = (await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 100, "stop": ["world"]})).json()["choices"][0]
        assert cut["text"] == "Hello, " and cut["stop_reason"] == "world"
        many = (await client.post("/v1/completions", json={"prompt": ["Hi", "Yo"], "max_tokens": 3, "n": 2})).json()
        assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
        assert {c["text"] for c in many["choices"]} == {REPLY[:3]}


async def test_a_failed_step_is_a_500_json_or_an_error_event_and_the_server_goes_on():
    runner = ScriptedRunner()
    async with running(fake_app(runner)) as client:
        runner.fail_on = lambda request_id: True  # every step fails from now on
        failed = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
        assert failed.status_code == 500
        assert set(failed.json()["error"]) == {"message", "type", "param", "code"}
        streamed = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": True})
        payloads = sse_payloads(streamed.text)
        assert payloads[-1] == "[DONE]" and "error" in json.loads(payloads[-2])
        runner.fail_on = None
        ok = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
        assert ok.json()["choices"][0]["text"] == REPLY[:3]
        assert (await client.get("/health")).status_code == 200
