"""``EngineCore``: the synchronous heart of one iteration.

``step()`` reads as a sentence: ``schedule()`` -> ``runner.step(batch)`` ->
``process(outputs)``. ``process`` appends sampled tokens (via the scheduler),
detokenizes them incrementally, applies stop strings and builds one
``RequestOutput`` delta per touched request (a pooling request's one
delta carries the vector the runner pooled). Each request's text state
(detokenizer, stop matcher, grammar, buffered prompt logprobs) lives on the
request itself; every finish (token stop, grammar end, stop string, abort,
error) is recorded by ``Scheduler.finish``, and every error finish (a runner
that raised, a drain, a stopped or dead engine) goes through ``fail``.

``step()`` is the only step function: tests and benchmarks call it directly,
and the asyncio ``DynamicBatcher`` calls the same ``step()`` on its model
thread, then publishes what it returned. The core counts its steps and keeps
a record of the recent ones (``StepRecord``) for the dashboard.
"""

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol

from batching.detokenizer import IncrementalDetokenizer
from batching.errors import InvalidRequestError
from batching.messages import RunnerOutput, SchedulerOutput, TokenLogprobs
from batching.outputs import RequestOutput
from batching.pooling_params import PoolingModel, PoolingParams
from batching.request import EncoderDecoderPrompts, Request, RequestStatus
from batching.sampling_params import SamplingParams
from batching.scheduler import Scheduler, TokenUpdate
from batching.stats import StepRecord
from batching.stop import StopDecision
from batching.stop_strings import StopStringMatcher
from batching.structured import GrammarCompiler
from batching.thinking import ThinkingGate

logger = logging.getLogger(__name__)

STEP_HISTORY_MAX = 20_000  # step records kept at most (a few minutes of fast steps)
POOLING_SAMPLING = SamplingParams(max_tokens=1)  # a pooling request's: it samples nothing


class Runner(Protocol):
    def step(self, scheduler_output: SchedulerOutput) -> RunnerOutput: ...


class EngineCore:
    """Scheduler + runner + text processing, with no threads and no asyncio."""

    def __init__(
        self,
        scheduler: Scheduler,
        runner: Runner,
        tokenizer: Any,
        eos_token_ids: tuple[int, ...] = (),
        vocab_size: int | None = None,
        max_model_len: int | None = None,
        encoder_decoder: EncoderDecoderPrompts | None = None,
        pooling: PoolingModel | None = None,
    ) -> None:
        self.scheduler = scheduler
        # Set for a pooling model (an embedder): requests pool their prompts, nothing is generated.
        self.pooling = pooling
        # Set for encoder-decoder models: prompts are sources (``EncoderDecoderPrompts``).
        self.encoder_decoder = encoder_decoder
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.num_pooled_total = 0  # pooling requests answered with a vector
        self._grammars: GrammarCompiler | None = None
        self.num_steps = 0  # model steps that ran to the end
        self.num_idle_steps = 0  # steps that found nothing to schedule
        self.step_seconds_total = 0.0  # time in runner.step, over num_steps
        self.step_records: deque[StepRecord] = deque(maxlen=STEP_HISTORY_MAX)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def make_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | PoolingParams) -> Request:
        """Validate and build a request (raises ``InvalidRequestError``): one
        that generates, or with ``PoolingParams`` one that pools its prompt."""
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if self.vocab_size is not None:
            bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(f"prompt token id {bad[0]} is out of range [0, {self.vocab_size})", param="prompt")
        if isinstance(params, PoolingParams) or self.pooling is not None:
            return self._pooling_request(request_id, prompt_token_ids, params)
        if self.vocab_size is not None:
            bad_bias = [t for t in params.logit_bias if not 0 <= t < self.vocab_size]
            if bad_bias:
                raise InvalidRequestError(f"logit_bias token id {bad_bias[0]} is out of range", param="logit_bias")
        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        extra_eos = tuple(t for t in self.eos_token_ids[1:] if t not in params.stop_token_ids)
        if extra_eos and not params.ignore_eos:
            params = dataclasses.replace(params, stop_token_ids=params.stop_token_ids + extra_eos)
        if self.encoder_decoder is not None:
            request = self._encoder_decoder_request(request_id, prompt_token_ids, params, eos)
        else:
            request = Request(request_id, list(prompt_token_ids), params, eos_token_id=eos)
        grammar = self.grammar_compiler.matcher(params.guided) if params.guided is not None else None
        if params.thinking is not None:
            grammar = ThinkingGate(params.thinking, grammar, self.grammar_compiler.vocab_size)
        request.grammar = grammar
        return request

    def _pooling_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | PoolingParams) -> Request:
        """A request that pools its prompt: only a pooling model serves one,
        and a pooling model serves nothing else."""
        if self.pooling is None:
            raise InvalidRequestError("this model generates text; it does not serve embeddings", code="model_not_supported")
        if not isinstance(params, PoolingParams):
            raise InvalidRequestError(
                f"this model is a pooling model: it serves {self.pooling.routes}, not text generation", code="model_not_supported"
            )
        self.pooling.check(params)
        if self.max_model_len is not None and len(prompt_token_ids) > self.max_model_len:
            raise InvalidRequestError(
                f"This model reads at most {self.max_model_len} tokens, but the input has {len(prompt_token_ids)}. "
                "Please shorten the input, or set truncate_prompt_tokens.",
                param="input",
                code="context_length_exceeded",
            )
        return Request(request_id, list(prompt_token_ids), POOLING_SAMPLING, pooling=params)

    def _encoder_decoder_request(self, request_id: str, source_token_ids: list[int], params: SamplingParams, eos: int | None) -> Request:
        """The prompt is the encoder's source; the decoder starts from its own prompt."""
        prompts = self.encoder_decoder
        if len(source_token_ids) > prompts.max_source_tokens:
            raise InvalidRequestError(
                f"This model's encoder reads at most {prompts.max_source_tokens} tokens, but the prompt has "
                f"{len(source_token_ids)}. Please shorten the prompt.",
                param="prompt",
                code="context_length_exceeded",
            )
        if params.prompt_logprobs is not None:
            raise InvalidRequestError(
                "prompt logprobs are not defined for an encoder-decoder model: the prompt is its encoder's input, "
                "which it does not predict",
                param="prompt_logprobs",
            )
        return Request(
            request_id, list(prompts.decoder_prompt_token_ids), params, eos_token_id=eos, encoder_token_ids=list(source_token_ids)
        )

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        if self._grammars is None:
            vocab_size = self.vocab_size if self.vocab_size is not None else len(self.tokenizer)
            self._grammars = GrammarCompiler(self.tokenizer, vocab_size, self.eos_token_ids)
        return self._grammars

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)
        self.num_prompt_tokens_total += request.num_encoder_tokens or request.num_prompt_tokens
        if request.pooling is not None:
            return  # no text to make
        params = request.sampling_params
        request.detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.skip_special_tokens)
        request.stop_matcher = StopStringMatcher(params.stop)
        if params.prompt_logprobs is not None:
            request.pending_prompt_logprobs = {}

    def abort(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> RequestOutput | None:
        request = self.scheduler.finish_request(request_id, status)
        if request is None:
            return None
        return self._output(request, [], "", [])

    def schedule(self) -> SchedulerOutput:
        return self.scheduler.schedule()

    def step(self) -> list[RequestOutput]:
        """One iteration: ``schedule()`` -> ``runner.step(batch)`` ->
        ``process(outputs)``. A runner that raises fails the step's requests
        (error deltas), never the caller."""
        scheduler_output = self.schedule()
        if scheduler_output.is_empty:
            self.num_idle_steps += 1
            return []
        started = time.perf_counter()
        try:
            runner_output = self.runner.step(scheduler_output)
        except Exception as exc:  # one bad step fails its requests, not the engine
            logger.exception("engine step failed")
            return self.fail_step(scheduler_output, f"engine step failed: {exc}")
        seconds = time.perf_counter() - started
        generated_before = self.num_generation_tokens_total
        outputs = self.process(scheduler_output, runner_output)
        self.num_steps += 1
        self.step_seconds_total += seconds
        num_generated = self.num_generation_tokens_total - generated_before
        self.step_records.append(StepRecord(time.monotonic(), scheduler_output.num_batched_tokens, num_generated, seconds))
        return outputs

    def process(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> list[RequestOutput]:
        for chunk_logprobs in runner_output.prompt_logprobs:
            chunk_request = self.scheduler.requests.get(chunk_logprobs.request_id)
            positions = None if chunk_request is None else chunk_request.pending_prompt_logprobs
            if positions is not None:
                for offset, logprob in enumerate(chunk_logprobs.logprobs):
                    positions[chunk_logprobs.first_position + offset] = logprob
        outputs = self._pooled_outputs(scheduler_output, runner_output) if self.pooling is not None else []
        updates = self.scheduler.update_from_output(scheduler_output, runner_output)
        self.num_generation_tokens_total += len(updates)
        # One delta per request: a speculating request may get several tokens in one step.
        grouped: dict[str, list[TokenUpdate]] = {}
        for update in updates:
            grouped.setdefault(update.request.request_id, []).append(update)
        for group in grouped.values():
            request = group[0].request
            if request.detokenizer is None:  # its text was already final
                continue
            token_ids = [update.token_id for update in group]
            logprobs = [update.logprobs for update in group if update.logprobs is not None]
            for token_id in token_ids:
                if request.grammar is not None and not request.is_finished:
                    self._advance_grammar(request, token_id)
            new_text = self._advance_text(request, token_ids)
            output = self._output(request, token_ids, new_text, logprobs)
            positions, request.pending_prompt_logprobs = request.pending_prompt_logprobs, None
            if positions is not None:
                output = dataclasses.replace(output, prompt_logprobs=[positions[p] for p in sorted(positions)])
            outputs.append(output)
        return outputs

    def _pooled_outputs(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> list[RequestOutput]:
        """The one delta of each pooling request the step finished: its vector, or an error where the runner gave none."""
        outputs = []
        for request, values in self.scheduler.finish_pooled(scheduler_output, runner_output):
            output = self._output(request, [], "", [])
            if values is None:
                outputs.append(dataclasses.replace(output, error="the runner pooled nothing for this request"))
            else:
                outputs.append(dataclasses.replace(output, pooled=values))
                self.num_pooled_total += 1
        return outputs

    def fail_step(self, scheduler_output: SchedulerOutput, message: str) -> list[RequestOutput]:
        """The runner raised on ``scheduler_output``: finish its requests with
        an error; the finishes it carried are sent again with the next step."""
        self.scheduler.step_failed(scheduler_output)
        return self.fail([chunk.request_id for chunk in scheduler_output.chunks], message)

    def fail(self, request_ids: Iterable[str], message: str, status: int = 500) -> list[RequestOutput]:
        """Finish requests with an error: recorded ``FINISHED_ERROR`` by the
        scheduler (blocks freed), each with its last delta carrying ``message``
        and the HTTP ``status`` the server reports (500: a failure; 503: the
        server is shutting down). Ids not (or no longer) here are skipped."""
        outputs = []
        for request_id in request_ids:
            output = self.abort(request_id, RequestStatus.FINISHED_ERROR)
            if output is not None:
                outputs.append(dataclasses.replace(output, error=message, error_status=status))
        return outputs

    def _advance_grammar(self, request: Request, token_id: int) -> None:
        """Feed the grammar the token it allowed; once it can take nothing more
        (the structured text is complete) report a stop to the scheduler."""
        if not request.grammar.accept(token_id):
            # The mask allowed only grammar tokens, so this is a bug, not bad input.
            self.scheduler.finish(request, StopDecision(RequestStatus.FINISHED_ERROR, f"grammar error: {request.grammar.error}"))
        elif request.grammar.is_stopped:
            self.scheduler.finish(request, StopDecision(RequestStatus.FINISHED_STOPPED))

    def _advance_text(self, request: Request, token_ids: list[int]) -> str:
        """Detokenize the new tokens and cut at a stop string (reported to the
        scheduler); at the finish, flush what was held and drop the text state."""
        text = request.detokenizer.step(token_ids)
        if request.is_finished:
            text += request.detokenizer.flush()
        safe_text, matched = request.stop_matcher.feed(text)
        if matched is not None:
            self.scheduler.finish(request, StopDecision(RequestStatus.FINISHED_STOPPED, matched))
        elif request.is_finished:
            safe_text += request.stop_matcher.flush()
        if request.is_finished:
            request.detokenizer = request.stop_matcher = None
        return safe_text

    @staticmethod
    def _output(request: Request, token_ids: list[int], text: str, logprobs: list[TokenLogprobs]) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=token_ids,
            new_text=text,
            logprobs=logprobs,
            finish_reason=request.status.finish_reason,
            stop_reason=request.stop_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_tokens,
            queue_time_s=None if request.first_scheduled_time is None else request.first_scheduled_time - request.arrival_time,
        )
