"""The runner's view of a decoder-only model (``DecoderOnlyStep``): its cache
shape (as the load-time check observed it) and the step forward, the model's
own ``forward`` run eagerly or compiled whole (``model_runtime.step_graph``).
``encoder_decoder.step.EncoderDecoderStep`` is the other kind; the runner
holds one of them and calls the same three members on either:
``cache_shape``, ``forward`` and ``forced_eos_bitmask``.
"""

import logging

import torch

from batching.messages import ScheduledChunk
from batching.runner_state import RunnerRequest
from model_runtime import kernels
from model_runtime.attention.context import StepContext
from model_runtime.attention.interface import SLOT_ATTRIBUTE, step_forward
from model_runtime.attention.metadata import pack
from model_runtime.cuda_graphs import DecodeGraphs, GraphLimits
from model_runtime.fused import fuse_elementwise, fused_steps
from model_runtime.kv_cache import CacheShape, PagedKVCache
from model_runtime.loading.loader import LoadedModel
from model_runtime.step_graph import CompiledForward, warm_up

logger = logging.getLogger(__name__)


class DecoderOnlyStep:
    """``forward`` runs every row of the flat batch through the model; with
    ``decode_kernel`` every layer's attention reads the step's metadata
    packed into one tensor (``attention.metadata``). With
    ``compile_max_tokens`` the forward is compiled for steps of up to that
    many tokens (``compiled`` stays None where the model cannot be)."""

    forced_eos_bitmask: bytes | None = None  # generate forces nothing on these models
    eager_reason: str | None = None  # why steps run eagerly although --compile asked otherwise

    def __init__(self, loaded: LoadedModel, kv_cache: PagedKVCache, decode_kernel: bool, compile_max_tokens: int | None) -> None:
        self.model = loaded.model
        self.device = loaded.device
        self.decode_kernel = decode_kernel
        if compile_max_tokens and hasattr(self.model, SLOT_ATTRIBUTE):
            self.eager_reason = "this model's decoder layers drop the forward's kwargs (its attention reads the step from a slot)"
            logger.warning("--compile: %s; running it eagerly", self.eager_reason)
            compile_max_tokens = None
        self.compiled = self._compile(kv_cache, compile_max_tokens) if compile_max_tokens else None
        # Eager steps on tokenstep's kernels run the layers' elementwise work fused (model_runtime.fused).
        self.fused = self.compiled is None and decode_kernel
        if self.fused:
            logger.info("eager steps fused: %s", fuse_elementwise(self.model, kernels.load()))

    def capture_graphs(self, kv_cache: PagedKVCache, limits: GraphLimits) -> DecodeGraphs:
        """CUDA graphs of this model's decode steps (``model_runtime.cuda_graphs``),
        recorded as steps run: without autograd."""
        with torch.inference_mode():
            return DecodeGraphs(self._run, kv_cache, limits)

    @staticmethod
    def cache_shape(loaded: LoadedModel) -> CacheShape:
        return loaded.attention.cache_shape

    def _compile(self, kv_cache: PagedKVCache, max_num_tokens: int) -> CompiledForward | None:
        """The compiled forward, warmed up for every step shape; None (eager
        steps, with a warning) where compiling fails, e.g. with no C++ compiler."""
        compiled = CompiledForward(self.model, native=self.decode_kernel)
        try:
            with torch.inference_mode():
                warm_up(compiled, kv_cache.key_caches, kv_cache.value_caches, max_num_tokens, with_mask=not self.decode_kernel)
        except Exception as error:  # torch.compile raises many kinds; any of them means: run eagerly
            why = str(error).splitlines()[0] if str(error) else type(error).__name__
            self.eager_reason = f"compiling the step forward failed: {why}"
            logger.warning("--compile: compiling the step forward failed, running it eagerly instead: %s", why)
            return None
        return compiled

    def forward(
        self,
        scheduled: list[tuple[ScheduledChunk, RunnerRequest]],
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        context: StepContext,
        logits_rows: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Logits ``[R, vocab]`` at ``logits_rows`` of the step (None without rows)."""
        if self.decode_kernel:  # every layer's attention in one C++ op
            context.metadata = pack(context)
        # With no sampling rows, keep a single row: the LM head cost is negligible.
        # Always rows as a tensor: an integer n means "the last n tokens", which some
        # models (Gemma 4's KV-shared layers) use to drop the other rows early.
        keep = logits_rows if logits_rows is not None else torch.tensor([0], device=self.device)
        if self.compiled is not None:
            logits = self.compiled(input_ids, position_ids, context, keep)
        else:
            logits = self._run(input_ids, position_ids, context, keep)
        return logits[0] if logits_rows is not None else None  # [R, vocab]

    def _run(self, input_ids: torch.Tensor, position_ids: torch.Tensor, context: StepContext, rows: torch.Tensor) -> torch.Tensor:
        """The eager forward: logits ``[1, R, vocab]`` at ``rows``."""
        if self.fused:
            with fused_steps():
                return step_forward(self.model, input_ids, position_ids, context, rows)
        return step_forward(self.model, input_ids, position_ids, context, rows)
