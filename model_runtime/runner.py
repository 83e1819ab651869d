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

What differs by model kind sits behind one object, ``self.model_step``: a
``decoder_only.DecoderOnlyStep`` (the model's own forward, eager or
compiled) or an ``encoder_decoder.step.EncoderDecoderStep`` (which first
encodes the sources of newly admitted requests into their cross blocks, then
runs the family's decoder step). Both give the cache shape, the step's
logits and the EOS a model's generation config forces.
"""

import dataclasses
import logging
from dataclasses import dataclass

import torch

from batching.messages import PromptLogprobs, RunnerOutput, SampledToken, ScheduledChunk, SchedulerOutput
from batching.runner_state import RunnerRequest, RunnerRequests
from model_runtime.attention import triton_paged
from model_runtime.attention.context import SequenceChunk, StepContext, build_step
from model_runtime.attention.interface import decode_kernel_runs
from model_runtime.cuda_graphs import DecodeGraphs, GraphLimits
from model_runtime.decoder_only import DecoderOnlyStep
from model_runtime.drafter import DraftModel, Lookahead
from model_runtime.encoder_decoder.step import EncoderDecoderStep
from model_runtime.kv_cache import PagedKVCache
from model_runtime.loading.loader import LoadedModel
from model_runtime.sampler import Sampler, SamplingRow, TokenCounts, prompt_logprobs
from model_runtime.step_graph import CompiledForward

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
        graphs: GraphLimits | None = None,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.block_size = block_size
        kind = model_step_kind(loaded)
        shape = kind.cache_shape(loaded)
        self.kv_cache = PagedKVCache(shape, num_blocks, block_size, self.device)
        self.decode_kernel = decode_kernel_runs(shape, self.device)
        self.model_step = kind(loaded, self.kv_cache, self.decode_kernel, compile_max_tokens)
        # On CUDA, an eager decoder's attention runs in the Triton kernels (attention.triton_paged).
        self.triton_attention = kind is DecoderOnlyStep and self.compiled is None and triton_paged.runs(self.device)
        # With it, decode-only steps replay CUDA graphs (not with a draft model, which mirrors every step eagerly).
        self.decode_graphs: DecodeGraphs | None = None
        if graphs is not None and self.triton_attention and draft is None and graphs.possible(self.device):
            try:
                self.decode_graphs = self.model_step.capture_graphs(self.kv_cache, graphs)
            except Exception as error:  # a model whose forward cannot be recorded (a host sync inside) runs eagerly
                why = str(error).splitlines()[0] if str(error) else type(error).__name__
                logger.warning("CUDA graphs: capturing the decode step failed, decode steps run eagerly: %s", why)
        # Draft-model speculation: the draft keeps a cache with the same block ids.
        self.drafter = DraftModel(draft, num_blocks, block_size) if draft is not None else None
        self.sampler = Sampler(loaded.vocab_size)
        self.requests = RunnerRequests()
        draft_bytes = self.drafter.kv_cache.kv_cache_bytes if self.drafter else 0
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.1f MiB%s)",
            num_blocks,
            block_size,
            self.kv_cache.num_tokens,
            self.kv_cache.kv_cache_bytes / 2**20,
            f" + {draft_bytes / 2**20:.1f} MiB for the draft model" if draft_bytes else "",
        )

    @property
    def compiled(self) -> CompiledForward | None:
        """The compiled step forward, or None where steps run eagerly."""
        return self.model_step.compiled

    @staticmethod
    def bytes_per_block(loaded: LoadedModel, block_size: int, draft: LoadedModel | None = None) -> int:
        """KV bytes one block costs: the target's, plus the draft model's."""
        target = model_step_kind(loaded).cache_shape(loaded).bytes_per_token() * block_size
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
        chunks = [SequenceChunk(chunk.new_token_ids, chunk.num_computed_tokens, request.block_ids) for chunk, request in scheduled]
        sampling = [(chunk, request) for chunk, request in scheduled if chunk.is_sampling and not chunk.draft_token_ids]
        draft_chunks = [chunk for chunk, _ in scheduled if chunk.draft_token_ids]
        rows = self._logits_rows(scheduled)
        kept = rows.all
        if self.decode_graphs is not None and self.decode_graphs.fits(chunks, kept):
            logits = self.decode_graphs.run(chunks)  # [R, vocab]
        else:
            input_ids, position_ids, context = self._prepare(chunks)
            kept_rows = torch.tensor(kept, device=self.device) if kept else None
            logits = self.model_step.forward(scheduled, input_ids, position_ids, context, kept_rows)  # [R, vocab]
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
        forced = self.model_step.forced_eos_bitmask
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

    def _prepare(self, chunks: list[SequenceChunk]) -> tuple[torch.Tensor, torch.Tensor, StepContext]:
        with_mask = not (self.decode_kernel or self.triton_attention)
        caches = self.kv_cache.key_caches, self.kv_cache.value_caches
        return build_step(chunks, *caches, self.device, with_mask=with_mask, triton=self.triton_attention)


def model_step_kind(loaded: LoadedModel) -> type[DecoderOnlyStep] | type[EncoderDecoderStep]:
    """What serves this kind of model's steps."""
    return EncoderDecoderStep if loaded.family else DecoderOnlyStep
