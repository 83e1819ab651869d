"""``PoolingRunner.step``: one ``SchedulerOutput`` of pooling requests in,
one vector (an embedder's) or one score (a cross-encoder's, for a text
pair) per request out (``RunnerOutput.pooled``).

The scheduler admits a pooling request whole, so each chunk is one
request's whole input. The step runs them as one batch through the model's
own forward: input ids right-padded to the longest, ``[B, L]``, with an
attention mask that keeps every row from reading another's padding, so a
row's result is the one its input gives alone (to float rounding, whatever
the batch); a pair's second text gets token type 1 where the tokenizer
gave it one. No KV cache: an encoder reads its whole input at once and
nothing of it is needed after the step. An embedder's hidden states are
pooled, cut to the request's ``dimensions`` and normalized as the
checkpoint says; a cross-encoder's logit goes through its activation
(``model_runtime.pooling.config``). Only lists of floats leave.
"""

import torch

from batching.messages import PooledOutput, RunnerOutput, ScheduledChunk, SchedulerOutput
from model_runtime.pooling.config import PoolingConfig, ScoreHead
from model_runtime.pooling.logit_score import LogitScoreHead


class PoolingRunner:
    """Owns a pooling model (``AutoModel``, or a cross-encoder's
    ``AutoModelForSequenceClassification``) and how it pools or scores.
    Padding uses the model's own pad id where it has one: a decoder
    cross-encoder finds each row's last token by it."""

    def __init__(
        self, model: torch.nn.Module, head: PoolingConfig | ScoreHead | LogitScoreHead, pad_token_id: int | None, device: torch.device
    ) -> None:
        self.model = model
        self.head = head
        model_pad = getattr(model.config, "pad_token_id", None)
        self.pad_token_id = model_pad if model_pad is not None else (pad_token_id or 0)
        self.device = device

    @torch.inference_mode()
    def step(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        chunks = scheduler_output.chunks
        if not chunks:
            return RunnerOutput(sampled=[])
        for chunk in chunks:
            if chunk.new_request is None or chunk.new_request.pooling is None or chunk.num_computed_tokens:
                raise ValueError(f"request {chunk.request_id}: a pooling model runs only whole pooling requests")
        if isinstance(self.head, LogitScoreHead):
            results = self.head.scores(self._last_logits(chunks))  # [B, 1]
            return RunnerOutput(
                sampled=[], pooled=[PooledOutput(chunk.request_id, values.tolist()) for chunk, values in zip(chunks, results)]
            )
        inputs = self._batch(chunks)  # input_ids, attention_mask (and token_type_ids): [B, L] each
        output = self.model(**inputs)
        if isinstance(self.head, ScoreHead):
            results = self.head.scores(output.logits.float())  # [B, 1]
        else:
            vectors = self.head.pool(output.last_hidden_state, inputs["attention_mask"]).float()  # [B, H]
            results = [
                self.head.finish(vectors[row : row + 1], chunk.new_request.pooling.dimensions)[0] for row, chunk in enumerate(chunks)
            ]
        return RunnerOutput(sampled=[], pooled=[PooledOutput(chunk.request_id, values.tolist()) for chunk, values in zip(chunks, results)])

    def _last_logits(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """A causal LM's logits at each row's last token, ``[B, vocab]``: the
        rows left-padded (so that token is every row's last) with explicit
        positions from 0 at each row's first real token, as it runs alone."""
        input_ids, mask = self._padded(chunks, left=True)  # [B, L] each
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, L]
        inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
        output = self.model(**{name: tensor.to(self.device) for name, tensor in inputs.items()}, logits_to_keep=1)  # logits [B, 1, vocab]
        return output.logits[:, -1]

    def _batch(self, chunks: list[ScheduledChunk]) -> dict[str, torch.Tensor]:
        """The chunks' inputs right-padded into ``[B, L]`` ids, a ``[B, L]``
        mask (1 on real tokens) and, where a pair marks its second text,
        ``[B, L]`` token types."""
        input_ids, mask = self._padded(chunks, left=False)  # [B, L] each
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        starts = [chunk.new_request.pooling.second_text_start for chunk in chunks]
        if any(start is not None for start in starts):
            types = torch.zeros_like(mask)  # [B, L]
            for row, (chunk, start) in enumerate(zip(chunks, starts)):
                if start is not None:
                    types[row, start : chunk.num_new_tokens] = 1
            inputs["token_type_ids"] = types
        return {name: tensor.to(self.device) for name, tensor in inputs.items()}

    def _padded(self, chunks: list[ScheduledChunk], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunks' ids padded to the longest, on the left or the right,
        ``[B, L]``, and the ``[B, L]`` mask of real tokens (1)."""
        width = max(chunk.num_new_tokens for chunk in chunks)
        input_ids = torch.full((len(chunks), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunks), width), dtype=torch.long)
        for row, chunk in enumerate(chunks):
            span = slice(width - chunk.num_new_tokens, width) if left else slice(0, chunk.num_new_tokens)
            input_ids[row, span] = torch.tensor(chunk.new_token_ids)
            mask[row, span] = 1
        return input_ids, mask
