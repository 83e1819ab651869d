"""The scheduler's configuration and the engine's defaults: the one place
the step budget, the running-request cap, the block size and the KV pool's
default size come from (the server's ``Settings`` and the engine factory
read them here; nothing else states them).
"""

from dataclasses import dataclass

# Default step token budgets. On CPU a small budget keeps prefill chunks from
# stalling decodes, but with many in flight a fixed small step leaves new
# prompts trickling in; so on CPU the budget grows with the running requests,
# 8 tokens each, unless one is given (the measurements that chose these:
# docs/PERFORMANCE.md, "Measurements behind choices in the code"). The budget
# is a scheduling policy that depends only on the device type, so it is
# resolved here, not in the tensor layer.
CPU_TOKEN_BUDGET = 128
CPU_TOKENS_PER_RUNNING_REQUEST = 8
CUDA_TOKEN_BUDGET = 2048
# A pooling model's step (embeddings, rerank pairs) has no decode to keep
# short, and an encoder is faster per token in bigger batches: all-MiniLM-L6-v2
# at 64 in flight, 128-token inputs, 20.5 inputs/s at 128 tokens a step, 31.7
# at 512, 32.2 at 2048, 30.8 at 8192 (AMD EPYC Zen 4, AVX-512, 2 cores, 2026-12-07; docs/BENCHMARKS.md).
POOLING_TOKEN_BUDGET = 2048
DEFAULT_MAX_NUM_SEQS = 64  # --max-num-seqs
DEFAULT_BLOCK_SIZE = 16  # --block-size (tokens per KV block)
# The KV pool without --kv-cache-memory: a fixed size on CPU, a share of the
# free memory on CUDA (resolved with the rest by
# ``server.engine_builder.resolve_defaults``).
CPU_KV_CACHE_MEMORY = "1GiB"
CUDA_KV_FRACTION = 0.8
DRAFT_MODEL_SPECULATIVE_TOKENS = 4  # --num-speculative-tokens with --speculative-model


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """The scheduler's limits. No defaults for the two limits: they come from
    the engine configuration (``server.engine_builder``, which resolves
    the device-dependent step budget), so no second default can disagree."""

    max_num_seqs: int
    max_num_batched_tokens: int
    # With N requests running, a step may batch up to this many tokens per
    # running request when that exceeds max_num_batched_tokens (0: fixed
    # budget), so prefill keeps pace as concurrency grows.
    tokens_per_running_request: int = 0
    # Speculative decoding: draft tokens per decoding request (0: off), from
    # n-gram lookup ("ngram") or the runner's draft model ("draft_model").
    num_speculative_tokens: int = 0
    speculative_method: str = "ngram"
    # Which waiting request runs next, and which running one gives its
    # blocks up when the pool is full (keys of ``batching.policies``).
    admission_policy: str = "fcfs"
    preemption_policy: str = "newest"

    @property
    def max_step_tokens(self) -> int:
        """The most tokens one step can carry (the budget at ``max_num_seqs``
        running, drafts included)."""
        budget = max(self.max_num_batched_tokens, self.tokens_per_running_request * self.max_num_seqs)
        return budget + self.max_num_seqs * self.num_speculative_tokens

    @classmethod
    def for_device(
        cls, device_type: str, *, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS, max_num_batched_tokens: int | None = None, **options: object
    ) -> "SchedulerConfig":
        """The config with the step budget resolved for ``device_type``
        (``"cpu"``, ``"cuda"``): a given budget is fixed; otherwise CUDA gets
        ``CUDA_TOKEN_BUDGET`` and a CPU ``CPU_TOKEN_BUDGET`` growing by
        ``CPU_TOKENS_PER_RUNNING_REQUEST`` per running request."""
        if max_num_batched_tokens is not None:
            budget, per_running_request = max_num_batched_tokens, 0
        elif device_type == "cuda":
            budget, per_running_request = CUDA_TOKEN_BUDGET, 0
        else:
            budget, per_running_request = CPU_TOKEN_BUDGET, CPU_TOKENS_PER_RUNNING_REQUEST
        return cls(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, tokens_per_running_request=per_running_request, **options)
