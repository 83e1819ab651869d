"""The draft model of draft-model speculative decoding (``--speculative-model``).

A smaller causal LM with the target's vocabulary keeps its own paged KV cache
with the *same* block ids and slot mapping as the target's, so the scheduler's
block tables serve both. Each step it

1. **mirrors** the target: one forward over exactly the step's flattened
   tokens (prefill chunks, decodes, draft chunks), writing its own K/V at the
   same slots, so its cache always holds the tokens the target holds (slots
   of rejected drafts are overwritten later, as in the target's cache);
2. **proposes**: for each chunk the scheduler gave ``num_lookahead_tokens`` k,
   it feeds the request's newest token (the one the target just picked) and
   then its own greedy picks, k decode forwards batched over those requests,
   and returns the k picks as the next step's drafts.

Step 2 writes K/V at the positions after the target's last token; the
scheduler allocated blocks for them (``num_lookahead_tokens``). Everything
runs on the model thread, on the target's device, in the target's dtype.
"""

import dataclasses
from dataclasses import dataclass

import torch

from model_runtime.attention.context import SequenceChunk, StepContext, build_step, context_mask
from model_runtime.attention.interface import decode_kernel_runs, step_forward
from model_runtime.kv_cache import PagedKVCache
from model_runtime.loading.loader import LoadedModel


@dataclass(frozen=True, slots=True)
class Lookahead:
    """One request to propose for: its newest ``token_id`` sits at ``position``."""

    request_id: str
    token_id: int
    position: int
    block_ids: list[int]
    num_tokens: int


class DraftModel:
    """A draft model and its KV cache (``num_blocks`` like the target's)."""

    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.block_size = block_size
        self.kv_cache = PagedKVCache(loaded.attention.cache_shape, num_blocks, block_size, self.device)
        self.decode_kernel = decode_kernel_runs(self.kv_cache.shape, self.device)

    @staticmethod
    def bytes_per_block(loaded: LoadedModel, block_size: int) -> int:
        return loaded.attention.cache_shape.bytes_per_token() * block_size

    def mirror(self, input_ids: torch.Tensor, position_ids: torch.Tensor, context: StepContext) -> None:
        """Run the target's step inputs through the draft model (K/V only)."""
        self._forward(input_ids, position_ids, self._own(context), rows=torch.tensor([0], device=self.device))

    def propose(self, lookaheads: list[Lookahead]) -> dict[str, list[int]]:
        """Greedy drafts for each request, ``num_tokens`` each, batched."""
        drafts: dict[str, list[int]] = {item.request_id: [] for item in lookaheads}
        tokens = {item.request_id: item.token_id for item in lookaheads}
        for step in range(max((item.num_tokens for item in lookaheads), default=0)):
            active = [item for item in lookaheads if item.num_tokens > step]
            positions = [item.position + step for item in active]
            input_ids, position_ids, context = self._decode_context(
                [item.block_ids for item in active], positions, [tokens[item.request_id] for item in active]
            )  # [1, B] each
            logits = self._forward(input_ids, position_ids, context, rows=torch.arange(len(active), device=self.device))[0]  # [B, vocab]
            picks = logits.max(dim=-1).indices.tolist()  # [B]
            for item, token_id in zip(active, picks):
                drafts[item.request_id].append(token_id)
                tokens[item.request_id] = token_id
        return drafts

    def _own(self, context: StepContext) -> StepContext:
        """The target's step over the draft model's caches. Where the target's
        attention runs in the C++ kernels and the draft's cannot (a head size
        the kernel does not take), the draft's decode rows get the SDPA mask."""
        own = dataclasses.replace(context, key_caches=self.kv_cache.key_caches, value_caches=self.kv_cache.value_caches)
        if context.metadata is not None and not self.decode_kernel:
            mask = None
            if context.num_decode_tokens:
                mask = context_mask(context.decode_context_lens, context.decode_block_tables.shape[1] * self.block_size)
            own = dataclasses.replace(own, metadata=None, decode_context_mask=mask)
        return own

    def _decode_context(
        self, block_tables: list[list[int]], positions: list[int], token_ids: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, StepContext]:
        chunks = [
            SequenceChunk([token_id], position, block_ids) for token_id, position, block_ids in zip(token_ids, positions, block_tables)
        ]
        return build_step(chunks, self.kv_cache.key_caches, self.kv_cache.value_caches, self.device, with_mask=not self.decode_kernel)

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, context: StepContext, rows: torch.Tensor) -> torch.Tensor:
        """Logits ``[1, len(rows), vocab]`` at the step's ``rows`` (a tensor, as the runner keeps them)."""
        return step_forward(self.model, input_ids, position_ids, context, rows)
