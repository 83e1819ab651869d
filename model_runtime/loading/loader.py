"""Load a causal LM (or a T5/BART-family encoder-decoder model) and its
tokenizer; choose device and dtype.

The kind of model is read off its config before anything loads: an
encoder-decoder config loads through ``AutoModelForSeq2SeqLM`` (never as
its decoder alone, which ``AutoModelForCausalLM`` would do with BART), one
of an unsupported kind is refused with a clear message.

``--device auto`` picks CUDA when present, else CPU. ``--dtype auto`` is
float32 on CPU and bfloat16 on CUDA (float16 when the GPU lacks bf16).

On CPU, float32 is the default because it is exact enough to be
reproducible: the same greedy request gives the same text whether its
prompt came from the prefix cache or was computed in a batch. ``--dtype
bfloat16`` (linears oneDNN-packed, see ``weights.layout``) is faster on some
CPUs and slower on others, and its rounding depends on the batch, so greedy
outputs can differ between runs, as in vLLM (docs/PERFORMANCE.md,
"Measurements behind choices in the code").

A GGUF source (a ``.gguf`` model, or the default model's shipped file) is
served by default from the file's own blocks with int16 activations
(``resolve_quantization``, ``resolve_activations``): on the CPU a fifth of
float32's weight memory and 2.4x its speed for one stream (AMD EPYC Zen 3,
AVX2, 2026-12-06; docs/BENCHMARKS.md), outputs
within rounding of the float model's (each row's result still independent
of its batch, so just as reproducible); ``--quantization none`` serves it as
float32, exactly ``generate``'s.
"""

import contextlib
import ctypes
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from batching.engine_config import ACTIVATIONS, DTYPES, QUANTIZATIONS, TASKS
from model_runtime import kernels
from model_runtime.attention.check import AttentionLayout, check_decoder, check_served_linears
from model_runtime.attention.interface import register as register_attention
from model_runtime.encoder_decoder.families import family_of
from model_runtime.loading.source_metadata import keep_metadata, metadata_source
from model_runtime.pooling.config import PoolingConfig, ScoreHead
from model_runtime.pooling.logit_score import LogitScoreHead
from model_runtime.pooling.model import is_pooling_checkpoint, load_pooling_model
from model_runtime.weights.gguf import block_types, load_gguf_linears
from model_runtime.weights.int_activations import quantize_activations
from model_runtime.weights.layout import PackedLinear, free_unread_copies, optimise_cpu_linears
from model_runtime.weights.quantization import choose_groupwise_kernels, describe, quantize_int8, to_float_linears

logger = logging.getLogger(__name__)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose {', '.join(DTYPES)}")
    return _DTYPES[dtype]


@dataclass(slots=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int  # logits per row (a composite model's text config says)
    # The encoder-decoder family ("t5", "bart"; model_runtime.encoder_decoder.step), None for a decoder-only model.
    family: str | None = None
    # A decoder-only model's attention as the load-time check found it (model_runtime.attention.check).
    attention: AttentionLayout | None = None
    # What the linears serve, as loaded (the start line says it): their weights' kind and their activations.
    weights: str = "float32"
    activations: str = "float32"
    # A pooling model (an embedder, or a cross-encoder that scores pairs): how it
    # pools or scores, and the length of what it returns per input; served by model_runtime.pooling.runner.
    pooling: PoolingConfig | ScoreHead | LogitScoreHead | None = None
    num_pooled_values: int = 0
    is_matryoshka: bool = False  # its vectors may be cut shorter (trained so)


def load_model(
    model_path: str | Path,
    dtype: str = "auto",
    device: str = "auto",
    quantization: str = "none",
    gguf_file: str | Path | None = None,
    activations: str = "float32",
    task: str = "auto",
) -> LoadedModel:
    """Load ``model_path`` (a local HF directory, a hub id or a ``.gguf``
    file, dequantized by transformers) with paged attention, its linears
    quantized as ``quantization`` says. ``gguf_file`` names the GGUF file a
    directory was converted from, for ``quantization="gguf"``, which serves
    the file's own quantized blocks. ``activations="int16"`` or ``"int8"``
    makes those quantized linears quantize their inputs too
    (``model_runtime.weights.int_activations``). ``"auto"`` for either is the
    server's default, decided by ``resolve_quantization`` and
    ``resolve_activations``. ``task`` (one of ``TASKS``) forces what the
    model serves; ``"auto"`` reads it off the checkpoint."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source, from_gguf = hf_source(model_path)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose {', '.join(TASKS)}")
    pooling = task in ("embed", "score") or (task == "auto" and not from_gguf and is_pooling_checkpoint(Path(source)))
    if pooling and (from_gguf or gguf_file is not None):
        raise ValueError(f"--task {task}: tokenstep serves pooling models from Hugging Face checkpoints, not GGUF files")
    if pooling:
        return load_pooling(Path(source), torch_device, torch_dtype, quantization, activations, task)
    gguf_file = gguf_file or (model_path if from_gguf else None)
    # A GGUF file's metadata (its vocabulary: seconds of parsing) is read once per load, and after the first from the cache.
    metadata = metadata_source(source, from_gguf)
    config = AutoConfig.from_pretrained(metadata[0], **metadata[1])
    family = model_family(config, source)
    asked_quantization, asked_activations = quantization, activations
    quantization = resolve_quantization(quantization, torch_device, torch_dtype, gguf_file, family)
    activations = resolve_activations(asked_activations, quantization)
    check_quantization(quantization, torch_device, torch_dtype, gguf_file, activations)
    if family is not None and (quantization != "none" or activations != "float32"):
        raise ValueError(f"--quantization and --activations serve decoder-only models; {model_path} is an encoder-decoder model")
    tokenizer = AutoTokenizer.from_pretrained(metadata[0], **metadata[1])
    keep_metadata(config, tokenizer, source, from_gguf)
    if family is None:
        with one_gguf_name_map():
            model, loading = AutoModelForCausalLM.from_pretrained(
                source, config=config, dtype=torch_dtype, attn_implementation=register_attention(), output_loading_info=True, **from_gguf
            )
        check_complete(model, loading["missing_keys"], source)
    else:  # its decoder runs tokenstep's own step (model_runtime.encoder_decoder.step); the encoder, SDPA
        model = AutoModelForSeq2SeqLM.from_pretrained(source, config=config, dtype=torch_dtype, attn_implementation="sdpa")
    model.to(torch_device).eval()
    if from_gguf:
        drop_gguf_quantizer(model)
    # Exact or refused: proven on the float model, before quantization swaps its linears.
    layout = check_decoder(model) if family is None else None
    weights, served_activations = str(torch_dtype).removeprefix("torch."), "float32"
    quantized = load_gguf_linears(model, gguf_file) if quantization == "gguf" else []
    if asked_quantization == "auto" and quantization == "gguf" and not quantized:  # a float GGUF file (F32, F16)
        quantization, activations = "none", resolve_activations(asked_activations, "none")
        check_quantization(quantization, torch_device, torch_dtype, gguf_file, activations)
    if quantization in ("int8", "gguf"):
        quantized = quantize_int8(model) if quantization == "int8" else quantized
        ops = kernels.load()
        weights = (
            "int8 groups of 32 (quantized at load)" if quantization == "int8" else f"the GGUF file's own blocks ({block_types(quantized)})"
        )
        if ops is None:  # no compiler: the same values as float32 linears, at float32's speed
            if activations != "float32":
                # Asked for by name, it is worth a warning; the default only says what it serves.
                (logger.info if asked_activations == "auto" else logger.warning)(
                    "--activations %s needs tokenstep's CPU kernels, which are unavailable: the activations stay float32", activations
                )
                served_activations = f"float32 (--activations {activations} needs the kernels)"
            weights += ", dequantized to float32 (no kernels)"
            linears = f"{to_float_linears(model)} linears dequantized to float32 (no kernels); {optimise_cpu_linears(model, torch_dtype)}"
        else:
            integer = activations != "float32" and quantize_activations(model, ops, activations)
            kept = choose_groupwise_kernels(model, ops)  # those whose activations stay float32
            linears = describe(quantized, kept) + (f"; {activations} activations" if integer else "")
            if integer:
                served_activations = activations + (f" ({len(kept)} linears in groups of 16 keep float32)" if kept else "")
    elif torch_device.type == "cpu":
        linears = optimise_cpu_linears(model, torch_dtype)
    else:
        linears = "default layout"
    if layout is not None:
        for module in model.modules():
            if isinstance(module, PackedLinear):
                module.read_outside = False
        check_served_linears(model, layout)  # the weight reads below are the forward's own
    if kept := free_unread_copies(model):
        linears += f"; {kept} checkpoint weights kept beside their packed copies: the model's own code reads them"
    if torch_device.type == "cpu":
        release_checkpoint(model)
        return_freed_heap()
    config = model.config
    max_model_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    logger.info("loaded %s on %s as %s (max_model_len %d; %s)", model_path, torch_device, torch_dtype, max_model_len, linears)
    if layout is not None:
        logger.info("attention checked against the model's own forward: %s", layout.describe())
    vocab_size = model.config.get_text_config(decoder=True).vocab_size
    return LoadedModel(
        model,
        tokenizer,
        torch_device,
        torch_dtype,
        max_model_len,
        _eos_token_ids(model, tokenizer),
        vocab_size,
        family,
        layout,
        weights,
        served_activations,
    )


def load_pooling(source: Path, device: torch.device, dtype: torch.dtype, quantization: str, activations: str, task: str) -> LoadedModel:
    """A pooling model (``model_runtime.pooling``), in its own float weights."""
    if quantization not in ("none", "auto") or activations not in ("float32", "auto"):
        raise ValueError(f"--quantization and --activations serve generative models; {source} is a pooling model (an embedder)")
    parts = load_pooling_model(source, device, dtype, task)
    logger.info(
        "loaded %s on %s as %s: a pooling model, %d values per input by %s (max_model_len %d)",
        source,
        device,
        dtype,
        parts.num_dimensions,
        parts.pooling.describe(),
        parts.max_model_len,
    )
    eos = (parts.tokenizer.sep_token_id,) if parts.tokenizer.sep_token_id is not None else ()
    return LoadedModel(
        parts.model,
        parts.tokenizer,
        device,
        dtype,
        parts.max_model_len,
        eos,
        parts.model.config.vocab_size,
        weights=str(dtype).removeprefix("torch."),
        pooling=parts.pooling,
        num_pooled_values=parts.num_dimensions,
        is_matryoshka=parts.is_matryoshka,
    )


def held_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage once (tied
    and shared tensors), oneDNN's packed weights by their element count."""
    strided, packed = {}, 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.layout == torch.strided:
            strided[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        else:
            packed += tensor.numel() * tensor.element_size()
    return sum(strided.values()) + packed


def release_checkpoint(model: nn.Module) -> None:
    """Copy what the model still reads from its checkpoint (embeddings,
    norms, biases, and float linears a layout kept) into memory of its own.
    transformers loads safetensors as views of one mapping of the file; while
    any one tensor views it, the pages the load touched stay resident (the
    default model: 513 MiB beside its served copies). Tied parameters stay
    tied; the buffers of tokenstep's own modules are its own already (and
    may be shared: a GGUF embedding reads the tied head's blocks)."""
    copies: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for module in model.modules():
            for name, parameter in list(module._parameters.items()):
                if parameter is not None and parameter.layout == torch.strided:
                    if id(parameter) not in copies:
                        copies[id(parameter)] = nn.Parameter(parameter.detach().clone(), requires_grad=False)
                    module._parameters[name] = copies[id(parameter)]
            if not type(module).__module__.startswith("model_runtime."):  # tokenstep's own modules built theirs
                for name, buffer in list(module._buffers.items()):
                    if buffer is not None and buffer.layout == torch.strided:
                        module._buffers[name] = buffer.clone()


def return_freed_heap() -> None:
    """Hand the heap the load freed back to the system: glibc keeps freed
    blocks of its main heap in the process, and the weights a layout or a
    quantization replaced were there (float32 packed for oneDNN: 1588 ->
    1240 MiB RSS for the default model). Nothing where the C library has no
    ``malloc_trim`` (musl, macOS)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def check_complete(model: nn.Module, missing_keys: set[str] | list[str], source: str | Path) -> None:
    """A causal LM whose checkpoint lacks weights it needs (transformers
    would start them at random, a BERT encoder's missing LM head, say)
    would answer with noise: refused."""
    if missing_keys:
        names = ", ".join(sorted(missing_keys)[:3]) + (", ..." if len(missing_keys) > 3 else "")
        raise ValueError(
            f"{source} lacks weights a {type(model).__name__} needs ({names}): it is no checkpoint of a causal LM "
            "(an encoder is served with --task embed)"
        )


def model_family(config: PretrainedConfig, source: str | Path) -> str | None:
    """None for a causal LM, the family of a supported encoder-decoder model;
    ``ValueError`` for anything else."""
    family = family_of(config)
    if family is None and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"{source} is a {config.model_type!r} model, which is not a causal LM: tokenstep serves decoder-only "
            f"causal LMs and T5/BART-family encoder-decoder models"
        )
    return family


@contextlib.contextmanager
def one_gguf_name_map() -> Iterator[None]:
    """While loading, gguf's tensor-name map is built once per (architecture,
    layers): transformers 5.2x builds it afresh for every module it walks
    while mapping a GGUF file's tensors (398 times for the default model's
    30 layers: 7 s of every start from a GGUF file). The map is a table of
    names, read only."""
    import gguf

    built = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(built)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = built


def hf_source(model_path: str | Path) -> tuple[str | Path, dict[str, str]]:
    """Where transformers loads ``model_path`` from, and the ``gguf_file``
    keyword when it is a GGUF file (loaded from its folder)."""
    path = Path(model_path)
    if path.suffix == ".gguf" and path.is_file():
        return path.parent, {"gguf_file": path.name}
    return model_path, {}


def drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """A model transformers dequantized from GGUF is plain float tensors; its
    quantizer hook would only get in the way of later module swaps."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def resolve_quantization(
    quantization: str, device: torch.device, dtype: torch.dtype, gguf_file: str | Path | None, family: str | None
) -> str:
    """``auto`` (the server's default): serve a GGUF source's own blocks
    (``gguf``; a ``.gguf`` model, or the default model's shipped file) where
    they can serve, a decoder-only model on the CPU in float32; else the
    checkpoint's dtype (``none``). Any other choice stands as given."""
    if quantization != "auto":
        return quantization
    servable = gguf_file is not None and family is None and device.type == "cpu" and dtype == torch.float32
    return "gguf" if servable else "none"


def resolve_activations(activations: str, quantization: str) -> str:
    """``auto`` (the server's default): int16 with a GGUF file's blocks
    (teacher-forced top-1 agreement with the float model 100 %, 12/12 greedy
    outputs identical on the default model, docs/BENCHMARKS.md), float32
    otherwise: weight-only int8 keeps float activations, as int16 on top of
    it changed 3 of 12 greedy outputs (Intel Xeon, 2026-12-03). int8
    activations stay opt-in: they move outputs more."""
    if activations != "auto":
        return activations
    return "int16" if quantization == "gguf" else "float32"


def check_quantization(
    quantization: str, device: torch.device, dtype: torch.dtype, gguf_file: str | Path | None = None, activations: str = "float32"
) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose {', '.join(QUANTIZATIONS)}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"unknown activations {activations!r}; choose {', '.join(ACTIVATIONS)}")
    if activations != "float32" and quantization not in ("int8", "gguf"):
        raise ValueError(f"--activations {activations} quantizes the inputs of quantized linears: use it with --quantization int8 or gguf")
    if quantization in ("int8", "gguf") and (device.type != "cpu" or dtype != torch.float32):
        raise ValueError(
            f"--quantization {quantization} runs on the CPU with float32 activations; got --device {device.type} "
            f"and --dtype {str(dtype).removeprefix('torch.')}"
        )
    if quantization == "gguf" and gguf_file is None:
        raise ValueError(
            "--quantization gguf serves a GGUF file's own quantized weights: give a .gguf file as the model (or serve the default model)"
        )


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """EOS ids from the generation config (may be a list), else the tokenizer."""
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
