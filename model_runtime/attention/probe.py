"""The parity probe of the load-time check (``model_runtime.attention.check``).

Two short sequences run in four ragged steps over a scratch cache, as the
server runs them (fresh prefills, chunks after cached tokens, decode rows
side by side), through the paths this host serves with (the C++ kernels
where they run); every logit is compared with what the model's own eager
attention and cache give for each sequence alone, as ``generate`` runs it
(a prefill, then a token at a time). Where a layer, a module or a config
has a sliding window, the probe runs again with every window shrunk to a
few tokens (in the configs and in the modules), so that it reaches past
them: a window the model applies in its masks or cache but does not hand to
attention, or one tokenstep would ignore, shows as differing rows.

It costs ten forwards of a few tokens each (twenty where something slides).
"""

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator

import torch
from transformers import PreTrainedModel

from model_runtime.attention import triton_paged
from model_runtime.attention.context import SequenceChunk, build_step
from model_runtime.attention.interface import ATTENTION_NAME, decode_kernel_runs, step_forward
from model_runtime.attention.metadata import pack
from model_runtime.kv_cache import CacheShape, PagedKVCache

logger = logging.getLogger(__name__)

PROBE_LENGTHS = (8, 10)  # tokens of the two probe sequences
# Each step's (start, end) of both sequences: fresh prefills, chunks after
# cached tokens, then PROBE_DECODE_STEPS decode steps; every kind covers at
# least 4 rows.
PROBE_STEPS = (((0, 4), (0, 5)), ((4, 6), (5, 8)), ((6, 7), (8, 9)), ((7, 8), (9, 10)))
PROBE_DECODE_STEPS = 2
PROBE_OUTLIER_ROWS = 2
PROBE_BLOCK_SIZE = 4
PROBE_WINDOW = 3  # sliding windows shrink to this (and up, one per distinct window)
# Largest |logit difference| / max(1, largest |logit|) of a row the probe
# accepts: float32 differs from the model's eager arithmetic by summation
# order only (seen: 1e-6); bfloat16 by rounding (seen: up to 3e-2). An
# attention feature left out differs by 0.3 to 1.6 (docs/MODELS.md).
PROBE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-1, torch.float16: 5e-2}


def probe_sequences(model: PreTrainedModel) -> list[list[int]]:
    """The probe's token ids: fixed, random over the model's vocabulary."""
    vocab_size = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(vocab_size, (n,), generator=generator).tolist() for n in PROBE_LENGTHS]


def prove_parity(
    model: PreTrainedModel, cache_shape: CacheShape, layer_windows: tuple[int | None, ...], refuse: Callable[[str], Exception]
) -> None:
    """Raise ``refuse(why)`` where tokenstep's steps differ from the model's
    own forward, as served and with every sliding window shrunk."""
    sequences = probe_sequences(model)
    _probe(model, sequences, cache_shape, refuse, "")
    # The config's windows too: a window the layers do not pass to attention
    # but the model's masks or cache apply would otherwise go unseen. One as
    # long as the model's context never bites (Phi-3.5-MoE's 131072).
    max_positions = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None) or float("inf")
    stated = {
        w for owner in _window_owners(model) if isinstance(w := getattr(owner, "sliding_window", None), int) and 0 < w < max_positions
    }
    windows = {w for w in layer_windows if w} | stated
    if windows:
        with _shrunk_windows(model, windows) as shrunk:
            _probe(model, sequences, cache_shape, refuse, f" with its sliding windows shrunk to {sorted(shrunk.values())} tokens")


def run_served_steps(model: PreTrainedModel, cache_shape: CacheShape, refuse: Callable[[str], Exception]) -> None:
    """Run the probe's ragged steps once more, now that tokenstep's linears
    (quantized, re-laid out) stand in the model, and raise ``refuse(why)``
    where the forward fails: model code that reads a projection's weight
    outside the projection would otherwise fail every request."""
    try:
        _paged_logits(model, probe_sequences(model), cache_shape)
    except Exception as error:  # whatever the model's own code raises
        first = str(error).splitlines()[0] if str(error) else ""
        raise refuse(f"its forward fails once tokenstep's linears stand in it ({type(error).__name__}: {first})") from error


def _probe(
    model: PreTrainedModel, sequences: list[list[int]], cache_shape: CacheShape, refuse: Callable[[str], Exception], condition: str
) -> None:
    """The ragged steps over a scratch cache against the model's own eager
    forward of each sequence alone; refuses where more than
    ``PROBE_OUTLIER_ROWS`` rows differ (every path of the steps covers more
    rows than that; a mixture of experts in bfloat16 may route a token or
    two differently)."""
    try:
        reference = _reference_logits(model, sequences)  # [rows, vocab]
    except Exception as error:
        raise refuse(
            f"its own eager forward with a cache fails{condition}, so there is nothing to prove tokenstep's steps "
            f"against ({type(error).__name__}: {error})"
        ) from error
    try:
        paged = _paged_logits(model, sequences, cache_shape)
    except Exception as error:
        raise refuse(f"its forward over tokenstep's ragged batch fails{condition} ({type(error).__name__}: {error})") from error
    row_errors = (paged - reference).abs().amax(-1) / reference.abs().amax(-1).clamp(min=1.0)  # [rows]
    tolerance = PROBE_TOLERANCE.get(model.dtype, PROBE_TOLERANCE[torch.bfloat16])
    num_differing = int((row_errors > tolerance).sum())
    logger.debug(
        "architecture probe%s: relative logit differences per row %s (tolerance %.0e)",
        condition,
        [round(e, 5) for e in row_errors.tolist()],
        tolerance,
    )
    if num_differing > PROBE_OUTLIER_ROWS:
        raise refuse(
            f"over tokenstep's ragged batch{condition}, {num_differing} of {len(row_errors)} rows of logits "
            f"differ from its own forward's (by up to {row_errors.max().item():.1e} of their scale)"
        )


def _reference_logits(model: PreTrainedModel, sequences: list[list[int]]) -> torch.Tensor:
    """``[sum of lengths, vocab]``: each sequence alone, as ``generate`` runs
    it, through the model's own eager attention and cache: a prefill of all
    but its last ``PROBE_DECODE_STEPS`` tokens, then one token at a time."""
    device = next(model.parameters()).device
    # transformers 5.2x renames the forward's past_key_values to cache, in the
    # output too (either old name warns).
    cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    rows = []
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            for tokens in sequences:
                input_ids = torch.tensor([tokens], device=device)
                head = len(tokens) - PROBE_DECODE_STEPS
                output = model(input_ids=input_ids[:, :head], use_cache=True)
                rows.append(output.logits[0])
                for position in range(head, len(tokens)):
                    output = model(
                        input_ids=input_ids[:, position : position + 1], use_cache=True, **{cache_kwarg: getattr(output, cache_kwarg)}
                    )
                    rows.append(output.logits[0])
    finally:
        model.set_attn_implementation(ATTENTION_NAME)
    return torch.cat(rows).float()


def _paged_logits(model: PreTrainedModel, sequences: list[list[int]], cache_shape: CacheShape) -> torch.Tensor:
    """The rows of ``_reference_logits``, computed as a server does, in
    ``PROBE_STEPS``: both sequences start as prefills, go on in chunks after
    their cached tokens, and end as decode rows side by side."""
    device = next(model.parameters()).device
    tables, num_blocks = [], 0
    for tokens in sequences:
        count = -(-len(tokens) // PROBE_BLOCK_SIZE)
        tables.append(list(range(num_blocks, num_blocks + count)))
        num_blocks += count
    cache = PagedKVCache(cache_shape, num_blocks, PROBE_BLOCK_SIZE, device)
    is_native = decode_kernel_runs(cache_shape, device)
    triton = triton_paged.runs(device)  # as the runner of an eager step
    rows: list[list[torch.Tensor]] = [[] for _ in sequences]
    with torch.inference_mode():
        for bounds in PROBE_STEPS:
            spans = sorted(enumerate(bounds), key=lambda span: span[1][1] - span[1][0] != 1)  # decode rows first
            chunks = [SequenceChunk(sequences[index][start:end], start, tables[index]) for index, (start, end) in spans]
            input_ids, position_ids, context = build_step(
                chunks, cache.key_caches, cache.value_caches, device, with_mask=not (is_native or triton), triton=triton
            )
            if is_native:
                context.metadata = pack(context)
            every_row = torch.arange(input_ids.shape[1], device=device)  # rows as a tensor, as the runner keeps them
            logits = step_forward(model, input_ids, position_ids, context, every_row)[0]
            for (index, _), chunk_logits in zip(spans, logits.float().split([len(chunk.token_ids) for chunk in chunks])):
                rows[index].append(chunk_logits)
    return torch.cat([row for sequence_rows in rows for row in sequence_rows])


@contextlib.contextmanager
def _shrunk_windows(model: PreTrainedModel, windows: set[int]) -> Iterator[dict[int, int]]:
    """Every ``sliding_window`` attribute of the model's configs and modules
    that holds one of ``windows`` set to a few tokens (a distinct size per
    window) for the duration. A window kept anywhere else stays large in
    one of the two forwards the probe compares, which then differ."""
    shrunk = {window: PROBE_WINDOW + index for index, window in enumerate(sorted(windows))}
    patched = [
        (owner, value)
        for owner in _window_owners(model)
        if isinstance(value := getattr(owner, "sliding_window", None), int) and value in shrunk
    ]
    try:
        for owner, value in patched:
            owner.sliding_window = shrunk[value]
        yield shrunk
    finally:
        for owner, value in patched:
            owner.sliding_window = value


def _window_owners(model: PreTrainedModel) -> list[object]:
    """The model's modules and configs (text configs included): where a
    ``sliding_window`` may be kept."""
    owners = {id(model.config): model.config}
    for module in model.modules():
        owners[id(module)] = module
        if (config := getattr(module, "config", None)) is not None:
            owners[id(config)] = config
    for config in list(owners.values()):
        if hasattr(config, "get_text_config"):
            text_config = config.get_text_config(decoder=True)
            owners[id(text_config)] = text_config
    return list(owners.values())
