"""A fake engine with the real interface: the real ``Scheduler``,
``EngineCore`` and ``DynamicBatcher`` over a scripted runner and a
character tokenizer, so engine and HTTP behaviour can be tested without
weights (DESIGN.md: "the server is testable with a fake engine").

``CharTokenizer``: token id = the character's code point (ids below 32 are
special: BOS 1, EOS 2). ``ScriptedRunner`` answers every sampling chunk with
the next character of ``REPLY`` for that request, then EOS; ``fail_on``
makes a step raise when it holds a given request (error isolation tests).
"""

from collections.abc import Callable

from batching.batcher import DynamicBatcher
from batching.block_manager import BlockManager
from batching.engine_core import EngineCore
from batching.messages import RunnerOutput, SampledToken, SchedulerOutput
from batching.runner_state import RunnerRequests
from batching.scheduler import Scheduler
from batching.scheduler_config import SchedulerConfig

BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
REPLY = "Hello, world! How are you?"
VOCAB_SIZE = 0x3000  # Latin, Cyrillic, CJK punctuation: enough for the tests' prompts
MAX_MODEL_LEN = 1024


class CharTokenizer:
    """The few Hugging Face tokenizer methods the engine and the server use."""

    eos_token_id = EOS_TOKEN_ID
    bos_token_id = BOS_TOKEN_ID
    all_special_ids = [BOS_TOKEN_ID, EOS_TOKEN_ID]
    added_tokens_decoder: dict[int, str] = {}
    chat_template = None

    def __len__(self) -> int:
        return VOCAB_SIZE

    def __call__(self, text: str, add_special_tokens: bool = True) -> "Encoding":
        return Encoding([ord(char) for char in text])

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self._piece(t) for t in token_ids if not (skip_special_tokens and t in self.all_special_ids))

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self._piece(token_id)

    @staticmethod
    def _piece(token_id: int) -> str:
        return {BOS_TOKEN_ID: "<s>", EOS_TOKEN_ID: "</s>"}.get(token_id, chr(token_id))


class Encoding:
    def __init__(self, input_ids: list[int]) -> None:
        self.input_ids = input_ids


class ScriptedRunner:
    """Replies ``REPLY`` character by character, then EOS, to every request."""

    def __init__(self, reply: str = REPLY, fail_on: Callable[[str], bool] | None = None) -> None:
        self.reply = [ord(char) for char in reply] + [EOS_TOKEN_ID]
        self.fail_on = fail_on
        self.num_steps = 0
        self.steps: list[list[str]] = []  # request ids of each step's chunks
        self.requests = RunnerRequests()  # its view of the requests, from the step messages

    def step(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        ids = [chunk.request_id for chunk in scheduler_output.chunks]
        self.num_steps += 1
        self.steps.append(ids)
        requests = self.requests.apply(scheduler_output)
        if self.fail_on is not None and any(self.fail_on(request_id) for request_id in ids):
            raise RuntimeError("scripted step failure")
        sampled = []
        for chunk, request in zip(scheduler_output.chunks, requests):
            if chunk.is_sampling:
                position = request.num_output_tokens
                sampled.append(SampledToken(chunk.request_id, self.reply[min(position, len(self.reply) - 1)]))
        return RunnerOutput(sampled=sampled)


def fake_core(runner: ScriptedRunner | None = None, num_blocks: int = 64, block_size: int = 16, max_num_seqs: int = 8) -> EngineCore:
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64), BlockManager(num_blocks, block_size))
    return EngineCore(
        scheduler,
        runner or ScriptedRunner(),
        CharTokenizer(),
        eos_token_ids=(EOS_TOKEN_ID,),
        vocab_size=VOCAB_SIZE,
        max_model_len=MAX_MODEL_LEN,
    )


def fake_batcher(runner: ScriptedRunner | None = None, **core_kwargs) -> DynamicBatcher:
    return DynamicBatcher(fake_core(runner, **core_kwargs))
