"""``PoolingRunner.step``: one ``SchedulerOutput`` of pooling requests in,
one vector per request out (``RunnerOutput.pooled``).

The scheduler admits a pooling request whole, so each chunk is one
request's whole input. The step runs them as one batch through the model's
own forward: input ids right-padded to the longest, ``[B, L]``, with an
attention mask that keeps every row from reading another's padding, so a
row's vector is the one its input gives alone (to float rounding, whatever
the batch). No KV cache: an encoder reads its whole input at once and
nothing of it is needed after the step. The hidden states are pooled,
cut to the request's ``dimensions`` and normalized as the checkpoint says
(``model_runtime.pooling.config``); only the vectors leave, as lists.
"""

import logging

import torch

from batching.messages import PooledOutput, RunnerOutput, ScheduledChunk, SchedulerOutput
from model_runtime.pooling.config import PoolingConfig

logger = logging.getLogger(__name__)


class PoolingRunner:
    """Owns a pooling model (``AutoModel``, no head) and how it pools."""

    def __init__(self, model: torch.nn.Module, pooling: PoolingConfig, pad_token_id: int | None, device: torch.device) -> None:
        self.model = model
        self.pooling = pooling
        self.pad_token_id = pad_token_id or 0
        self.device = device

    @torch.inference_mode()
    def step(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        chunks = scheduler_output.chunks
        if not chunks:
            return RunnerOutput(sampled=[])
        for chunk in chunks:
            if chunk.new_request is None or chunk.new_request.pooling is None or chunk.num_computed_tokens:
                raise ValueError(f"request {chunk.request_id}: a pooling model runs only whole pooling requests")
        input_ids, mask = self._batch(chunks)  # [B, L] each
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [B, L, H]
        vectors = self.pooling.pool(hidden, mask).float()  # [B, H]
        pooled = []
        for row, chunk in enumerate(chunks):
            dimensions = chunk.new_request.pooling.dimensions
            vector = self.pooling.finish(vectors[row : row + 1], dimensions)[0]  # [dimensions or H]
            pooled.append(PooledOutput(chunk.request_id, vector.tolist()))
        return RunnerOutput(sampled=[], pooled=pooled)

    def _batch(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunks' inputs right-padded into ``[B, L]`` ids and a ``[B, L]`` mask (1 on real tokens)."""
        width = max(chunk.num_new_tokens for chunk in chunks)
        input_ids = torch.full((len(chunks), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunks), width), dtype=torch.long)
        for row, chunk in enumerate(chunks):
            input_ids[row, : chunk.num_new_tokens] = torch.tensor(chunk.new_token_ids)
            mask[row, : chunk.num_new_tokens] = 1
        return input_ids.to(self.device), mask.to(self.device)
