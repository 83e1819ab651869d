"""Everything that touches tensors: loading, the paged KV cache, attention,
the step forward and sampling.

Knows nothing of HTTP or asyncio. Receives ``batching.messages.SchedulerOutput``
(plain data) and returns ``batching.messages.RunnerOutput`` (plain data).
"""
