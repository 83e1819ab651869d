"""The paged KV cache: preallocated per-layer K and V tensors.

Each layer owns ``K`` and ``V`` of shape
``[num_blocks, block_size, num_kv_heads, head_dim]`` (its own heads and sizes). Block ids come from
``batching.block_manager``; token ``t`` of a sequence lives at slot
``block_ids[t // block_size] * block_size + t % block_size``.
"""

import re
from dataclasses import dataclass

import torch

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_memory_size(text: str | int) -> int:
    """Parse ``512MiB``, ``2GiB``, ``1.5GB`` or a plain byte count into bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"invalid memory size {text!r}: use bytes or e.g. 512MiB, 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def free_device_bytes(device: torch.device) -> int | None:
    """The memory free on a CUDA device right now, for sizing its KV pool;
    None elsewhere (a CPU pool has a fixed default size)."""
    if device.type != "cuda":
        return None
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return free_bytes


@dataclass(frozen=True, slots=True)
class LayerKV:
    """One layer's cached token: its KV heads and their key and value sizes
    (which differ under DeepSeek's multi-head latent attention, expanded per
    head as transformers computes it)."""

    num_kv_heads: int
    head_dim: int
    value_head_dim: int
    # KV sharing (Gemma 3n and 4): the earlier layer whose keys and values this
    # one is handed, and whose cache it reads; it holds none of its own.
    shares_kv_of: int | None = None


@dataclass(frozen=True, slots=True)
class CacheShape:
    """What one cached token costs, layer by layer (Gemma 4's full layers
    have heads twice the size of its sliding ones)."""

    layers: tuple[LayerKV, ...]
    dtype: torch.dtype

    @classmethod
    def uniform(
        cls, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, value_head_dim: int | None = None
    ) -> "CacheShape":
        """Every layer alike."""
        return cls((LayerKV(num_kv_heads, head_dim, value_head_dim or head_dim),) * num_layers, dtype)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def bytes_per_token(self) -> int:
        element_size = torch.empty((), dtype=self.dtype).element_size()
        own = [layer for layer in self.layers if layer.shares_kv_of is None]
        return sum(layer.num_kv_heads * (layer.head_dim + layer.value_head_dim) for layer in own) * element_size


class PagedKVCache:
    """Per-layer K/V block pools, allocated once at start-up."""

    def __init__(self, shape: CacheShape, num_blocks: int, block_size: int, device: torch.device) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache budget is smaller than one block; raise --kv-cache-memory")
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        # [num_blocks, block_size, num_kv_heads, head_dim] per layer (value_head_dim for values);
        # a layer that shares another's keys and values gets that layer's tensors
        # (it writes the same values into the same slots, and reads what the other reads).
        self.key_caches: list[torch.Tensor] = []
        self.value_caches: list[torch.Tensor] = []
        for layer in shape.layers:
            if layer.shares_kv_of is not None:
                self.key_caches.append(self.key_caches[layer.shares_kv_of])
                self.value_caches.append(self.value_caches[layer.shares_kv_of])
                continue
            self.key_caches.append(
                torch.zeros(num_blocks, block_size, layer.num_kv_heads, layer.head_dim, dtype=shape.dtype, device=device)
            )
            self.value_caches.append(
                torch.zeros(num_blocks, block_size, layer.num_kv_heads, layer.value_head_dim, dtype=shape.dtype, device=device)
            )

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_tokens * self.shape.bytes_per_token()
