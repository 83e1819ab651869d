"""The paged KV cache: preallocated per-layer K and V tensors.

Each layer owns ``K`` and ``V`` of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``. Block ids come from
``batching.block_manager``; token ``t`` of a sequence lives at slot
``block_ids[t // block_size] * block_size + t % block_size``.
"""

import re
from dataclasses import dataclass

import torch

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_memory_size(text: str | int) -> int:
    """Parse ``512MiB``, ``2GiB``, ``1.5GB`` or a plain byte count into bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"invalid memory size {text!r}: use bytes or e.g. 512MiB, 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(frozen=True, slots=True)
class CacheShape:
    """What one cached token costs. Keys and values may differ in head size
    (DeepSeek's multi-head latent attention, expanded per head)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    value_head_dim: int | None = None  # None: the keys' head_dim

    def __post_init__(self) -> None:
        if self.value_head_dim is None:
            object.__setattr__(self, "value_head_dim", self.head_dim)

    def bytes_per_token(self) -> int:
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * self.num_kv_heads * (self.head_dim + self.value_head_dim) * element_size


class PagedKVCache:
    """Per-layer K/V block pools, allocated once at start-up."""

    def __init__(self, shape: CacheShape, num_blocks: int, block_size: int, device: torch.device) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache budget is smaller than one block; raise --kv-cache-memory")
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        key_shape = (num_blocks, block_size, shape.num_kv_heads, shape.head_dim)
        value_shape = (num_blocks, block_size, shape.num_kv_heads, shape.value_head_dim)
        # [num_blocks, block_size, num_kv_heads, head_dim] per layer (value_head_dim for values)
        self.key_caches = [torch.zeros(key_shape, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)]
        self.value_caches = [torch.zeros(value_shape, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_tokens * self.shape.bytes_per_token()
