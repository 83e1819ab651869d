"""``ModelRunner.step``: one ``SchedulerOutput`` in, one ``RunnerOutput`` out.

First folds the step's deltas into what it keeps per request
(``batching.runner_state``: tokens, block table, penalty counts), then
turns the scheduled chunks into the step's tensors:
flat ``input_ids``/``position_ids`` ``[1, T]``, a ``slot_mapping`` ``[T]``,
padded block tables for the decode rows and a span per prefill chunk. Decode
chunks (one new token) are placed first so attention can batch them. Runs the
model's own forward once, computes logits only at the rows that sample, and
samples one token per sampling chunk. A chunk carrying n-gram draft tokens
(speculative decoding, greedy requests only) runs like a short prefill; the
argmax at each of its last ``1 + drafts`` rows verifies the next draft, and
the drafts up to the first disagreement are accepted, followed by the
model's own token there. With a draft model (``model_runtime.drafter``) the
step also runs through the draft model, which then proposes the next step's
drafts for the chunks that ask (``num_lookahead_tokens``).

For an encoder-decoder model (``model_runtime.encoder_decoder.step``) the step
first encodes the sources of newly admitted requests into their cross
blocks; the tokens of the step are then decoder tokens, and the forward is
the family's decoder step, which also cross-attends from each row's blocks.
"""

import dataclasses
import logging
from dataclasses import dataclass

import torch

from batching.messages import PromptLogprobs, RunnerOutput, SampledToken, ScheduledChunk, SchedulerOutput
from batching.runner_state import RunnerRequest, RunnerRequests
from model_runtime.attention.context import SequenceChunk, StepContext, build_step
from model_runtime.attention.interface import SLOT_ATTRIBUTE, decode_kernel_runs, step_forward
from model_runtime.attention.metadata import pack
from model_runtime.drafter import DraftModel, Lookahead
from model_runtime.encoder_decoder.cross_attention import CrossContext, cross_context
from model_runtime.encoder_decoder.step import EncoderDecoderStep, cache_shape
from model_runtime.kv_cache import CacheShape, PagedKVCache
from model_runtime.loading.loader import LoadedModel
from model_runtime.sampler import Sampler, SamplingRow, TokenCounts, prompt_logprobs
from model_runtime.step_graph import CompiledForward, warm_up

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PromptRows:
    """Rows of the step whose logits score ``request``'s prompt tokens from
    ``first_position`` on (the row of position p predicts the token at p + 1)."""

    request: RunnerRequest
    first_position: int
    rows: list[int]


@dataclass(frozen=True, slots=True)
class LogitsRows:
    """The step's rows whose logits are kept, in the order they are kept:
    each sampling chunk's last row, each draft chunk's last ``1 + drafts``
    rows, then the prompt-logprob rows."""

    sample: list[int]
    draft: list[int]
    prompt: list[PromptRows]

    @property
    def all(self) -> list[int]:
        return self.sample + self.draft + [row for span in self.prompt for row in span.rows]


class ModelRunner:
    """Owns the model, the KV cache tensors and the sampler. With
    ``compile_max_tokens`` the step forward is compiled whole
    (``model_runtime.step_graph``) for steps of up to that many tokens."""

    def __init__(
        self,
        loaded: LoadedModel,
        num_blocks: int,
        block_size: int = 16,
        draft: LoadedModel | None = None,
        compile_max_tokens: int | None = None,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.block_size = block_size
        self.encoder_decoder = EncoderDecoderStep(self.model, loaded.family) if loaded.family else None
        shape = self.cache_shape(loaded)
        self.kv_cache = PagedKVCache(shape, num_blocks, block_size, self.device)
        self.decode_kernel = decode_kernel_runs(shape, self.device)
        # Draft-model speculation: the draft keeps a cache with the same block ids.
        self.drafter = DraftModel(draft, num_blocks, block_size) if draft is not None else None
        self.sampler = Sampler(loaded.vocab_size)
        self.requests = RunnerRequests()
        if compile_max_tokens and self.encoder_decoder is not None:
            logger.warning("--compile: the step forward of encoder-decoder models is not compiled; running it eagerly")
            compile_max_tokens = None
        if compile_max_tokens and hasattr(self.model, SLOT_ATTRIBUTE):
            logger.warning(
                "--compile: this model's decoder layers drop the forward's kwargs (its attention reads the step from "
                "a slot); running it eagerly"
            )
            compile_max_tokens = None
        self.compiled = self._compile(compile_max_tokens) if compile_max_tokens else None
        draft_bytes = self.drafter.kv_cache.kv_cache_bytes if self.drafter else 0
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.1f MiB%s)",
            num_blocks,
            block_size,
            self.kv_cache.num_tokens,
            self.kv_cache.kv_cache_bytes / 2**20,
            f" + {draft_bytes / 2**20:.1f} MiB for the draft model" if draft_bytes else "",
        )

    def _compile(self, max_num_tokens: int) -> CompiledForward | None:
        """The compiled forward, warmed up for every step shape; None (eager
        steps, with a warning) where compiling fails, e.g. with no C++ compiler."""
        compiled = CompiledForward(self.model, native=self.decode_kernel)
        try:
            with torch.inference_mode():
                warm_up(compiled, self.kv_cache.key_caches, self.kv_cache.value_caches, max_num_tokens, with_mask=not self.decode_kernel)
        except Exception as error:  # torch.compile raises many kinds; any of them means: run eagerly
            logger.warning(
                "--compile: compiling the step forward failed, running it eagerly instead: %s",
                str(error).splitlines()[0] if str(error) else type(error).__name__,
            )
            return None
        return compiled

    @staticmethod
    def cache_shape(loaded: LoadedModel) -> CacheShape:
        if loaded.family:
            return cache_shape(loaded.model, loaded.dtype)
        return loaded.attention.cache_shape

    @staticmethod
    def bytes_per_block(loaded: LoadedModel, block_size: int, draft: LoadedModel | None = None) -> int:
        """KV bytes one block costs: the target's, plus the draft model's."""
        target = ModelRunner.cache_shape(loaded).bytes_per_token() * block_size
        return target + (DraftModel.bytes_per_block(draft, block_size) if draft is not None else 0)

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @torch.inference_mode()
    def step(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        scheduled = list(zip(scheduler_output.chunks, self.requests.apply(scheduler_output)))
        scheduled.sort(key=lambda pair: pair[0].num_new_tokens != 1)  # decode rows first
        if not scheduled:
            return RunnerOutput(sampled=[])
        cross = None
        if self.encoder_decoder is not None:
            self._encode(scheduled)
            cross = self._cross_context(scheduled)
        input_ids, position_ids, context = self._prepare(scheduled)
        sampling = [(chunk, request) for chunk, request in scheduled if chunk.is_sampling and not chunk.draft_token_ids]
        draft_chunks = [chunk for chunk, _ in scheduled if chunk.draft_token_ids]
        rows = self._logits_rows(scheduled)
        kept = rows.all
        logits = self._forward(
            input_ids, position_ids, context, torch.tensor(kept, device=self.device) if kept else None, cross
        )  # [R, vocab]
        if self.drafter is not None:
            self.drafter.mirror(input_ids, position_ids, context)
        if logits is None:
            return RunnerOutput(sampled=[])
        sampling_rows = [self._sampling_row(chunk, request) for chunk, request in sampling]
        results = self.sampler.sample(logits[: len(rows.sample)], sampling_rows)
        sampled = [SampledToken(chunk.request_id, token_id, logprobs) for (chunk, _), (token_id, logprobs) in zip(sampling, results)]
        offset = len(rows.sample)
        if draft_chunks:
            sampled += self._verify_drafts(logits[offset : offset + len(rows.draft)], draft_chunks)
            offset += len(rows.draft)
        if self.drafter is not None:
            sampled = self._propose_drafts(scheduled, sampled)
        return RunnerOutput(sampled=sampled, prompt_logprobs=self._prompt_logprobs(logits[offset:], rows.prompt))

    def _sampling_row(self, chunk: ScheduledChunk, request: RunnerRequest) -> SamplingRow:
        """The sampler's view of a request; its penalty counts persist on the
        request and take in only the tokens added since the last step."""
        params = request.sampling_params
        counts = None
        if params.has_penalties:
            if request.sampler_state is None:
                request.sampler_state = TokenCounts(request.prompt_token_ids, self.sampler.vocab_size, self.device)
            counts = request.sampler_state.update(request.output_token_ids)
        return SamplingRow(params, request.num_output_tokens, request.eos_token_id, self._allowed_tokens(chunk, request), counts)

    def _allowed_tokens(self, chunk: ScheduledChunk, request: RunnerRequest) -> bytes | None:
        """The chunk's grammar bitmask; or, for the last token of an
        encoder-decoder request whose generation config forces EOS there
        (BART's, as ``model.generate`` does), a bitmask allowing only EOS."""
        params = request.sampling_params
        forced = self.encoder_decoder.forced_eos_bitmask if self.encoder_decoder is not None else None
        if (
            chunk.grammar_bitmask is None
            and forced is not None
            and not params.ignore_eos
            and request.num_output_tokens == params.max_tokens - 1
        ):
            return forced
        return chunk.grammar_bitmask

    def _verify_drafts(self, logits: torch.Tensor, draft_chunks: list[ScheduledChunk]) -> list[SampledToken]:
        """Greedy verification: ``logits`` holds each draft chunk's last
        ``1 + drafts`` rows in order; the argmax at row i checks draft i."""
        picks = self.sampler.greedy(logits).tolist()  # [num draft rows]
        sampled, start = [], 0
        for chunk in draft_chunks:
            drafts = chunk.draft_token_ids
            chunk_picks = picks[start : start + len(drafts) + 1]
            start += len(chunk_picks)
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == chunk_picks[accepted]:
                accepted += 1
            sampled.append(SampledToken(chunk.request_id, chunk_picks[accepted], None, drafts[:accepted]))
        return sampled

    def _propose_drafts(self, scheduled: list[tuple[ScheduledChunk, RunnerRequest]], sampled: list[SampledToken]) -> list[SampledToken]:
        """The draft model's proposals for the chunks that asked for them,
        continuing from each request's newest token (accepted drafts included),
        which sits at position ``num_tokens + accepted``."""
        asking = {chunk.request_id: (chunk, request) for chunk, request in scheduled if chunk.num_lookahead_tokens}
        lookaheads = []
        for token in sampled:
            if token.request_id not in asking:
                continue
            chunk, request = asking[token.request_id]
            position = request.num_tokens + len(token.accepted_draft_ids)
            lookaheads.append(Lookahead(token.request_id, token.token_id, position, request.block_ids, chunk.num_lookahead_tokens))
        if not lookaheads:
            return sampled
        drafts = self.drafter.propose(lookaheads)
        return [
            dataclasses.replace(token, next_draft_token_ids=drafts[token.request_id]) if token.request_id in drafts else token
            for token in sampled
        ]

    @staticmethod
    def _logits_rows(scheduled: list[tuple[ScheduledChunk, RunnerRequest]]) -> LogitsRows:
        """Rows whose logits are needed: each sampling chunk's last row; each
        draft chunk's last ``1 + drafts`` rows (in chunk order); and for
        prompt-logprob requests every row that predicts a prompt token."""
        sample_rows: list[int] = []
        draft_rows: list[int] = []
        prompt_spans: list[PromptRows] = []
        start = 0
        for chunk, request in scheduled:
            end = start + chunk.num_new_tokens
            if chunk.draft_token_ids:
                draft_rows.extend(range(end - len(chunk.draft_token_ids) - 1, end))
            elif chunk.is_sampling:
                sample_rows.append(end - 1)
            if request.sampling_params.prompt_logprobs is not None:
                # Row of position p predicts the token at p + 1.
                last_position = min(chunk.num_computed_tokens + chunk.num_new_tokens, len(request.prompt_token_ids) - 1)
                num_rows = max(last_position - chunk.num_computed_tokens, 0)
                if num_rows:
                    prompt_spans.append(PromptRows(request, chunk.num_computed_tokens + 1, list(range(start, start + num_rows))))
            start = end
        return LogitsRows(sample_rows, draft_rows, prompt_spans)

    def _prompt_logprobs(self, logits: torch.Tensor, prompt_spans: list[PromptRows]) -> list[PromptLogprobs]:
        """``logits``: the prompt rows' logits, span after span."""
        results, offset = [], 0
        for span in prompt_spans:
            span_logits = logits[offset : offset + len(span.rows)]  # [n, vocab]
            offset += len(span.rows)
            targets = span.request.prompt_token_ids[span.first_position : span.first_position + len(span.rows)]
            num_top = span.request.sampling_params.prompt_logprobs
            logprobs = prompt_logprobs(span_logits, targets, num_top, self.sampler.vocab_size)
            results.append(PromptLogprobs(span.request.request_id, span.first_position, logprobs))
        return results

    def _encode(self, scheduled: list[tuple[ScheduledChunk, RunnerRequest]]) -> None:
        """Encode the sources of the requests admitted (or resumed) in this step."""
        for chunk, request in scheduled:
            if chunk.new_request is not None:
                self.encoder_decoder.encode(
                    request.encoder_token_ids, request.cross_block_ids, self.kv_cache.key_caches, self.kv_cache.value_caches
                )

    def _cross_context(self, scheduled: list[tuple[ScheduledChunk, RunnerRequest]]) -> CrossContext:
        """Each row's cross blocks, in the order ``_prepare`` lays the rows out."""
        decode = [request for chunk, request in scheduled if chunk.num_new_tokens == 1]
        prefill = [request for chunk, request in scheduled if chunk.num_new_tokens != 1]
        return cross_context(
            [r.cross_block_ids for r in decode],
            [len(r.encoder_token_ids) for r in decode],
            [r.cross_block_ids for r in prefill],
            [len(r.encoder_token_ids) for r in prefill],
            self.block_size,
            self.device,
            with_mask=not self.decode_kernel,
        )

    def _forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        context: StepContext,
        logits_rows: torch.Tensor | None,
        cross: CrossContext | None = None,
    ) -> torch.Tensor | None:
        if cross is not None:
            return self.encoder_decoder.forward(input_ids, position_ids, context, cross, logits_rows)
        # With no sampling rows, keep a single row: the LM head cost is negligible.
        # Always rows as a tensor: an integer n means "the last n tokens", which some
        # models (Gemma 4's KV-shared layers) use to drop the other rows early.
        keep = logits_rows if logits_rows is not None else torch.tensor([0], device=self.device)
        if self.compiled is not None:
            logits = self.compiled(input_ids, position_ids, context, keep)
        else:
            logits = step_forward(self.model, input_ids, position_ids, context, keep)
        return logits[0] if logits_rows is not None else None  # [S, vocab]

    def _prepare(self, scheduled: list[tuple[ScheduledChunk, RunnerRequest]]) -> tuple[torch.Tensor, torch.Tensor, StepContext]:
        chunks = [SequenceChunk(chunk.new_token_ids, chunk.num_computed_tokens, request.block_ids) for chunk, request in scheduled]
        input_ids, position_ids, context = build_step(
            chunks, self.kv_cache.key_caches, self.kv_cache.value_caches, self.device, with_mask=not self.decode_kernel
        )
        if self.decode_kernel and self.encoder_decoder is None:  # every layer's attention in one C++ op
            context.metadata = pack(context)
        return input_ids, position_ids, context
