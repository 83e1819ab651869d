"""The hand-rolled server most people write first, as a baseline for `tokenstep bench`.

FastAPI + ``model.generate`` with a ``TextIteratorStreamer``, one request at a
time behind a lock, serving the OpenAI completions shape (string or token-id
prompt, ``max_tokens``, ``temperature``, ``ignore_eos``, ``stream`` with
``stream_options.include_usage``) so the bench can drive it unchanged.

    .venv/bin/python benchmarks/naive_hf_server.py MODEL_DIR --port 8001
"""

import argparse
import asyncio
import json
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer


def build_app(model_dir: str, name: str) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # One generate at a time, held by the generating thread itself.
    generate_lock = threading.Lock()
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "root": model_dir, "owned_by": "naive"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt = body["prompt"]
        input_ids = tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature", 1.0))
        kwargs = dict(
            input_ids=torch.tensor([input_ids]),
            attention_mask=torch.ones(1, len(input_ids), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.eos_token_id,
        )
        if body.get("ignore_eos"):
            kwargs["min_new_tokens"] = max_tokens
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        request_id = f"cmpl-{uuid.uuid4().hex}"

        async def run() -> "asyncio.Queue[str | None]":
            queue: asyncio.Queue[str | None] = asyncio.Queue()
            loop = asyncio.get_running_loop()

            def worker() -> None:
                with generate_lock:
                    thread = threading.Thread(target=model.generate, kwargs={**kwargs, "streamer": streamer})
                    thread.start()
                    for text in streamer:
                        loop.call_soon_threadsafe(queue.put_nowait, text)
                    thread.join()
                loop.call_soon_threadsafe(queue.put_nowait, None)

            threading.Thread(target=worker, daemon=True).start()
            return queue

        def chunk(text: str, finish: str | None = None, usage: dict | None = None) -> str:
            choices = [] if usage else [{"index": 0, "text": text, "finish_reason": finish}]
            payload = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": name, "choices": choices}
            if usage:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        if body.get("stream"):

            async def events():
                queue = await run()
                pieces = 0
                while (text := await queue.get()) is not None:
                    if text:
                        pieces += 1
                        yield chunk(text)
                output_tokens = max_tokens if body.get("ignore_eos") else pieces
                yield chunk("", "length")
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield chunk(
                        "",
                        usage={
                            "prompt_tokens": len(input_ids),
                            "completion_tokens": output_tokens,
                            "total_tokens": len(input_ids) + output_tokens,
                        },
                    )
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        queue = await run()
        parts = []
        while (text := await queue.get()) is not None:
            parts.append(text)
        return JSONResponse(
            {
                "id": request_id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": name,
                "choices": [{"index": 0, "text": "".join(parts), "finish_reason": "length"}],
            }
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--name", default="naive")
    args = parser.parse_args()
    uvicorn.run(build_app(args.model_dir, args.name), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
