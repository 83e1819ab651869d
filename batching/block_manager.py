"""KV-cache block accounting: which physical blocks each request owns.

Pure bookkeeping over integer block ids; the tensors behind them live in
``model_runtime.kv_cache``. A block holds ``block_size`` consecutive tokens of
one sequence. With prefix caching, every *full* block is keyed by a hash chained
over (parent block's key, its token ids), so two requests with the same prefix
share the same physical blocks by reference count. A block whose count drops to
zero keeps its key and goes to the back of the free queue; allocation takes from
the front, so cached blocks are reused least-recently-freed first (LRU) and stay
hittable until then.

Where every layer of the model attends at most ``sliding_window`` tokens
back (Mistral, StarCoder2, Qwen2 with its window on every layer), the blocks
that fall wholly before a running request's window go back to the pool as
it advances (``drop_out_of_window``; with their keys, so a later request with
the same prefix may still hit them), and a request holds about a window's
worth of blocks however long it runs, as vLLM's and SGLang's sliding-window
managers do. A model with some full-attention layer (Gemma 2 and 3, gpt-oss)
keeps every block its full layers read.

Encoder-decoder requests also hold cross blocks (``Request.cross_block_ids``:
the cross-attention K/V of their source), taken from the same pool at
admission and never shared or cached: freed, they go to the front of the
queue. Their decoder blocks are keyed like any others, but the chain starts
from a hash of the source, since the decoder's K/V depend on it.
"""

from collections import OrderedDict
from dataclasses import dataclass

from batching.request import Request

BlockKey = tuple[int, tuple[int, ...]]


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Allocates, shares and frees KV blocks for requests.

    Invariants: a block is in ``_free`` iff its ``ref_count`` is 0; a key in
    ``_cached`` maps to the block whose ``key`` it is; each request's
    ``block_ids`` cover at least its computed tokens, and it holds those
    from ``num_dropped_blocks`` on.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, sliding_window: int | None = None) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Tokens back any layer reads, where every layer slides; None: all of them.
        self.sliding_window = sliding_window
        self._blocks = [Block(block_id) for block_id in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._cached: dict[BlockKey, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by a live request (0.0 to 1.0)."""
        return self.num_used_blocks / self.num_blocks if self.num_blocks else 0.0

    def block_map(self, free: str, cached: str, used: str) -> str:
        """One letter per block: ``used`` when a request holds it, ``cached``
        when free but keeping a prefix for reuse, else ``free``."""
        return "".join(used if block.ref_count else cached if block.key is not None else free for block in self._blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def max_blocks_held(self, num_tokens: int, max_chunk_tokens: int) -> int:
        """The most blocks a request of ``num_tokens`` ever holds at once,
        in chunks of up to ``max_chunk_tokens``: all of its blocks, or with a
        sliding window, the window's (less the query) plus one chunk's, one
        more where they straddle a block boundary."""
        num_blocks = self.blocks_needed(num_tokens)
        if self.sliding_window is None:
            return num_blocks
        return min(num_blocks, self.blocks_needed(self.sliding_window - 1 + max_chunk_tokens) + 1)

    def drop_out_of_window(self, request: Request) -> None:
        """Return to the pool the request's blocks wholly before its next
        query's window (that query sits at ``num_computed_tokens``; a query at
        p sees keys after p - sliding_window). Kept keys stay hittable."""
        if self.sliding_window is None:
            return
        first_visible = request.num_computed_tokens - self.sliding_window + 1
        num_droppable = min(max(first_visible, 0) // self.block_size, len(request.block_ids))
        for block_id in request.block_ids[request.num_dropped_blocks : num_droppable]:
            self._release(block_id)
        request.num_dropped_blocks = max(request.num_dropped_blocks, num_droppable)

    def find_cached_prefix(self, request: Request) -> tuple[list[int], int]:
        """Return (block_ids, num_tokens) of the longest cached prefix.

        At least one token is always left uncached, because the step that
        computes it is the one that produces the next token's logits.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        max_full_blocks = (request.num_tokens - 1) // self.block_size
        block_ids: list[int] = []
        for key in self._keys_for(request, max_full_blocks)[:max_full_blocks]:
            block_id = self._cached.get(key)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids, len(block_ids) * self.block_size

    def allocate_cross(self, request: Request) -> bool:
        """Give an encoder-decoder request the cross blocks its source needs
        (on admission). Returns False, changing nothing, when the pool is too small."""
        needed = self.blocks_needed(request.num_encoder_tokens) - len(request.cross_block_ids)
        if needed > self.num_free_blocks:
            return False
        request.cross_block_ids.extend(self._take_fresh() for _ in range(max(needed, 0)))
        return True

    def allocate(self, request: Request, num_new_tokens: int, cached_block_ids: list[int] = ()) -> bool:
        """Give ``request`` blocks for ``num_computed_tokens + num_new_tokens`` tokens.

        ``cached_block_ids`` (from ``find_cached_prefix``, on admission only)
        are shared, not copied. Returns False, changing nothing, when the pool
        is too small.
        """
        num_cached = len(cached_block_ids)
        num_total_blocks = self.blocks_needed(max(request.num_computed_tokens, num_cached * self.block_size) + num_new_tokens)
        num_fresh = num_total_blocks - len(request.block_ids) - num_cached
        reusable_free = sum(1 for b in cached_block_ids if self._blocks[b].ref_count == 0)
        if num_fresh > self.num_free_blocks - reusable_free:
            return False
        for block_id in cached_block_ids:
            self._take(block_id)
        request.block_ids.extend(cached_block_ids)
        for _ in range(max(num_fresh, 0)):
            request.block_ids.append(self._take_fresh())
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's newly full, computed blocks under their keys."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        keys = self._keys_for(request, num_full)
        # Only blocks that became full since the last call: earlier ones were handled then.
        # Dropped blocks were registered before they went (or came keyed from the
        # prefix cache); their ids are stale and may hold another request's tokens now.
        first_new = max(request.num_registered_blocks, request.num_dropped_blocks)
        request.num_registered_blocks = num_full
        for index in range(first_new, num_full):
            key = keys[index]
            block = self._blocks[request.block_ids[index]]
            if block.key is None and key not in self._cached:
                block.key = key
                self._cached[key] = block.block_id

    def free(self, request: Request) -> None:
        """Drop the request's references; tail blocks are evicted first, and
        cross blocks (which hold nothing reusable) before any of them."""
        for block_id in request.cross_block_ids:
            self._blocks[block_id].ref_count = 0
            self._free[block_id] = None
            self._free.move_to_end(block_id, last=False)
        request.cross_block_ids = []
        for block_id in reversed(request.block_ids[request.num_dropped_blocks :]):
            self._release(block_id)
        request.block_ids = []
        request.num_dropped_blocks = 0
        request.block_keys = []
        request.num_registered_blocks = 0

    def _keys_for(self, request: Request, num_full_blocks: int) -> list[BlockKey]:
        """The request's chained block keys, extended to at least ``num_full_blocks``
        (computed once per block, from that block's tokens only)."""
        keys = request.block_keys
        while len(keys) < num_full_blocks:
            index = len(keys)
            parent = hash(keys[-1]) if keys else self._root_hash(request)
            chunk = tuple(request.token_slice(index * self.block_size, (index + 1) * self.block_size))
            keys.append((parent, chunk))
        return keys

    @staticmethod
    def _root_hash(request: Request) -> int:
        """Where a request's key chain starts: 0, or its source's hash."""
        return hash(tuple(request.encoder_token_ids)) if request.encoder_token_ids is not None else 0

    def _release(self, block_id: int) -> None:
        """Drop one reference; an unreferenced block joins the back of the free queue."""
        block = self._blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} freed twice"
        if block.ref_count == 0:
            self._free[block_id] = None

    def _take(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.key is not None:
            # Evict: the block is reused for new content.
            if self._cached.get(block.key) == block_id:
                del self._cached[block.key]
            block.key = None
        block.ref_count = 1
        return block_id
