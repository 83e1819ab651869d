"""The engine's configuration: ``EngineConfig``, what the engine was asked
for, and the vocabulary of its choices.

Each engine default and each choice list is stated here once. The server's
``Settings`` takes its engine fields' defaults and choices from here (and
the CLI its flags from ``Settings``); ``server.engine_builder.engine_config``
is the one mapping from settings to this frozen object; ``model_runtime``
checks its arguments against these lists. Torch-free and plain data, so
every layer may read it.
"""

from dataclasses import dataclass, fields
from pathlib import Path

from batching.scheduler_config import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_SEQS

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("auto", "none", "int8", "gguf")
ACTIVATIONS = ("auto", "float32", "int16", "int8")
TASKS = ("auto", "generate", "embed", "score")
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What the engine was asked for. None means "by device or model":
    ``server.engine_builder.resolve_defaults`` decides each such default,
    in one place.

    ``kv_cache_memory`` is a size (``"1GiB"``) or None; ``num_kv_blocks``
    overrides it exactly (used by tests to force preemption).
    """

    model: str | Path | None = None  # None: the embedded default model
    dtype: str = "auto"  # one of DTYPES
    device: str = "auto"  # DEVICE_PATTERN
    # One of QUANTIZATIONS. "auto": a GGUF source's own blocks ("gguf") on the
    # CPU in float32, else the checkpoint's dtype ("none"); the loader decides.
    quantization: str = "auto"
    # The GGUF file ``model`` was converted from, for ``quantization="gguf"``
    # (None: the default model's own; a ``.gguf`` model is its own).
    gguf_file: str | Path | None = None
    # One of ACTIVATIONS. "int16"/"int8": quantized linears round their inputs
    # to integers too; "auto": int16 with a GGUF file's blocks, else float32.
    activations: str = "auto"
    # One of TASKS: what the model serves. "auto": read off the checkpoint
    # (model_runtime.pooling.model.is_pooling_checkpoint); the others force it.
    task: str = "auto"
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_cache_memory: str | int | None = None
    num_kv_blocks: int | None = None
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    # Speculative decoding: draft tokens per greedy request per step; from
    # n-gram lookup, or from ``speculative_model``.
    num_speculative_tokens: int | None = None
    speculative_model: str | Path | None = None
    # Compile the step forward whole (``model_runtime.step_graph``).
    compile: bool = False
    # CUDA: run decode steps eagerly rather than replaying the CUDA graphs
    # captured at start (``model_runtime.cuda_graphs``).
    enforce_eager: bool = False
    # Where converted models and compiled kernels live (None: the platform's
    # user cache), and whether to leave tokenstep's C++ kernels out.
    cache_dir: str | Path | None = None
    no_kernels: bool = False


def engine_default(name: str) -> object:
    """The default of ``EngineConfig.<name>``, for ``Settings`` to state it by reference."""
    return next(field.default for field in fields(EngineConfig) if field.name == name)
