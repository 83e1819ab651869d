"""A step's attention metadata packed into one int64 tensor, for the C++
step op and the compiled graph: ``pack`` flattens a ``StepContext`` (block
tables, lengths, prefill spans, slot mapping); ``unpack`` rebuilds it as
views of that tensor. No Python object of the step reaches a compiled graph,
so none becomes one of its guards.

``unpack`` runs once per layer of a compiled step; the step's serial number
(the header's first field) lets the later layers reuse the first one's
result. That memo and the serial counter are process-wide on purpose: the
graph's op receives only the tensor, and one process steps one model batch
at a time (the worker thread).
"""

import itertools

import torch

from model_runtime.attention.context import PrefillSpan, StepContext, context_mask

# Header of the packed metadata: serial, T, decode rows, their table width,
# prefill chunks, and the block size where decode runs through SDPA (which
# needs the context mask) or 0.
_HEADER = 6
_PREFILL_FIELDS = 4  # start, num_new_tokens, num_computed_tokens, num_blocks
_serials = itertools.count(1)


def pack(context: StepContext) -> torch.Tensor:
    """The step's metadata as one int64 tensor ``[n]``, n > 6:
    header, slot mapping ``[T]``, decode lengths ``[B]`` and tables ``[B *
    width]``, per prefill (start, new, computed, number of blocks), then the
    prefills' block ids."""
    num_tokens = context.slot_mapping.shape[0]
    num_decode = context.num_decode_tokens
    width = context.decode_block_tables.shape[1] if num_decode else 0
    spans = [(s.start, s.num_new_tokens, s.num_computed_tokens, s.block_ids.shape[0]) for s in context.prefills]
    mask_block_size = context.decode_context_mask.shape[-1] // width if context.decode_context_mask is not None else 0
    header = [next(_serials), num_tokens, num_decode, width, len(spans), mask_block_size]
    parts = [
        torch.tensor(header + [v for span in spans for v in span], dtype=torch.long, device=context.slot_mapping.device),
        context.slot_mapping,
    ]
    if num_decode:
        parts += [context.decode_context_lens, context.decode_block_tables.flatten()]
    parts += [span.block_ids for span in context.prefills]
    return torch.cat(parts)


_last_unpacked: tuple[int, StepContext] | None = None


def unpack(metadata: torch.Tensor) -> StepContext:
    """The ``StepContext`` (without caches) that ``pack`` flattened, as views
    of ``metadata``; remembered for the step's other layers."""
    global _last_unpacked
    serial, num_tokens, num_decode, width, num_prefills, mask_block_size = metadata[:_HEADER].tolist()
    if _last_unpacked is not None and _last_unpacked[0] == serial:
        return _last_unpacked[1]
    spans = metadata[_HEADER : _HEADER + num_prefills * _PREFILL_FIELDS].view(num_prefills, _PREFILL_FIELDS).tolist()
    at = _HEADER + num_prefills * _PREFILL_FIELDS
    slot_mapping = metadata[at : at + num_tokens]
    at += num_tokens
    tables = lens = mask = None
    if num_decode:
        lens = metadata[at : at + num_decode]
        tables = metadata[at + num_decode : at + num_decode + num_decode * width].view(num_decode, width)
        at += num_decode + num_decode * width
        if mask_block_size:
            mask = context_mask(lens, width * mask_block_size)
    prefills = []
    for start, num_new, num_computed, num_blocks in spans:
        prefills.append(PrefillSpan(start, num_new, num_computed, metadata[at : at + num_blocks]))
        at += num_blocks
    context = StepContext([], [], slot_mapping, num_decode, tables, lens, mask, prefills)
    _last_unpacked = (serial, context)
    return context
