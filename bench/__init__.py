"""``tokenstep bench``: a load generator for any OpenAI-compatible server.

Data flow: ``cli`` parses flags and probes the server (``client.probe_server``:
model id, a sample of valid token ids) → ``datasets`` builds the prompts →
``runner`` sends them (Poisson arrivals, a concurrency cap, a hard deadline)
through ``client.send_request``, which streams SSE and times each chunk →
``stats`` turns per-request timings into ``vllm bench serve``'s metrics →
``report`` prints the table, writes the JSON and draws the plots.

Nothing here imports torch or the engine: it only speaks HTTP.
"""
