"""HTTP layer: FastAPI app, OpenAI wire schemas, SSE, auth, CLI and settings.

Never imports torch. Talks to the engine only through ``DynamicBatcher``
(plain-data requests in, ``RequestOutput`` deltas out) and the tokenizer.
"""
