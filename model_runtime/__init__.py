"""Everything that touches tensors, in rooms: ``loading`` (a path to a
``LoadedModel``), ``attention`` (the function models call, the step context,
the load-time check), ``weights`` (quantized and re-laid-out linears),
``encoder_decoder`` (T5/BART decoder steps and cross-attention) and
``kernels`` (the C++ ops, built on this machine). At the top: the runner
(``runner``: one step of the batch), its ``sampler``, ``drafter`` and
``step_graph`` (``--compile``), the paged ``kv_cache`` and ``paths``.

Knows nothing of HTTP or asyncio, and of ``batching`` only the plain step
messages: receives ``batching.messages.SchedulerOutput`` and returns
``batching.messages.RunnerOutput``.
"""
