"""BlockManager: allocate/free accounting, shared prefix blocks by reference
count, the prefix-cache lookup and the LRU order in which freed cached blocks
are reused. Pure bookkeeping: no model, no scheduler."""

import pytest

from batching.block_manager import BlockManager
from batching.request import Request
from batching.sampling_params import SamplingParams
from tests.batching.factories import create_request, ref_count

BLOCK_SIZE = 16


def prompt(*, prefix: list[int], tail_start: int, tail_len: int) -> list[int]:
    return [*prefix, *range(tail_start, tail_start + tail_len)]


def compute(block_manager: BlockManager, request: Request, num_new: int, cached: list[int] = ()) -> None:
    """What one scheduler step does to a request: allocate, compute, cache."""
    assert block_manager.allocate(request, num_new, cached)
    request.num_computed_tokens = max(request.num_computed_tokens, len(cached) * block_manager.block_size)
    request.num_computed_tokens += num_new
    block_manager.cache_full_blocks(request)


def admit(block_manager: BlockManager, request: Request) -> int:
    """Admit ``request`` with whatever prefix is cached; return the hit tokens."""
    cached, num_cached = block_manager.find_cached_prefix(request)
    compute(block_manager, request, request.num_tokens - num_cached, cached)
    return num_cached


def hit_tokens(block_manager: BlockManager, prompt_token_ids: list[int]) -> int:
    probe = create_request("probe", prompt_token_ids)
    _, num_cached = block_manager.find_cached_prefix(probe)
    block_manager.free(probe)  # drops the probe's memoised keys; it holds no block
    return num_cached


PREFIX_A = list(range(1000, 1000 + 3 * BLOCK_SIZE))  # exactly three full blocks


# --- allocate / free accounting -------------------------------------------------


def test_allocate_and_free_accounting() -> None:
    block_manager = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
    request = create_request("a", list(range(20)))

    assert block_manager.allocate(request, 20)
    assert len(request.block_ids) == 2
    assert len(set(request.block_ids)) == 2
    assert (block_manager.num_used_blocks, block_manager.num_free_blocks) == (2, 8)
    assert block_manager.usage == pytest.approx(0.2)
    request.num_computed_tokens = 20

    # Decoding up to 32 tokens fits the two blocks; the 33rd needs a third.
    for _ in range(12):
        request.output_token_ids.append(100)
        assert block_manager.allocate(request, 1)
        request.num_computed_tokens += 1
        assert len(request.block_ids) == 2
    request.output_token_ids.append(100)
    assert block_manager.allocate(request, 1)
    assert len(request.block_ids) == 3
    assert block_manager.num_used_blocks == 3

    block_manager.free(request)
    assert request.block_ids == []
    assert (block_manager.num_used_blocks, block_manager.num_free_blocks) == (0, 10)
    assert block_manager.usage == 0.0


def test_blocks_needed_rounds_up() -> None:
    block_manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    assert [block_manager.blocks_needed(n) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_allocate_returns_false_and_changes_nothing_when_pool_is_too_small() -> None:
    block_manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    holder = create_request("holder", list(range(40)))
    assert block_manager.allocate(holder, 40)  # 3 blocks
    holder_blocks = list(holder.block_ids)

    greedy = create_request("greedy", list(range(100, 120)))
    assert not block_manager.allocate(greedy, 20)  # needs 2, 1 free
    assert greedy.block_ids == []
    assert holder.block_ids == holder_blocks
    assert (block_manager.num_used_blocks, block_manager.num_free_blocks) == (3, 1)
    assert all(ref_count(block_manager, b) == 1 for b in holder_blocks)

    # A request that already holds blocks keeps exactly those on failure.
    holder.num_computed_tokens = 40
    holder.output_token_ids.extend([7] * 30)
    assert not block_manager.allocate(holder, 30)  # 70 tokens: 5 blocks > 4
    assert holder.block_ids == holder_blocks
    assert block_manager.num_free_blocks == 1


def test_allocate_counts_free_cached_blocks_it_reuses_against_the_pool() -> None:
    """A cached block sitting in the free queue is not also a fresh block."""
    block_manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    first = create_request("first", prompt(prefix=PREFIX_A, tail_start=1, tail_len=1))
    admit(block_manager, first)  # 4 blocks: the whole pool
    block_manager.free(first)  # all four free again, three of them cached

    # Three cached + two fresh > 4 blocks: refused, and the cache is untouched.
    too_long = create_request("too-long", prompt(prefix=PREFIX_A, tail_start=500, tail_len=20))
    cached, num_cached = block_manager.find_cached_prefix(too_long)
    assert num_cached == 3 * BLOCK_SIZE
    assert not block_manager.allocate(too_long, too_long.num_tokens - num_cached, cached)
    assert too_long.block_ids == []
    assert block_manager.num_free_blocks == 4
    assert hit_tokens(block_manager, [*PREFIX_A, 9]) == 3 * BLOCK_SIZE

    # Three cached + one fresh fits exactly.
    fits = create_request("fits", prompt(prefix=PREFIX_A, tail_start=600, tail_len=5))
    assert admit(block_manager, fits) == 3 * BLOCK_SIZE
    assert block_manager.num_free_blocks == 0


def test_double_free_asserts() -> None:
    block_manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    request = create_request("a", list(range(20)))
    assert block_manager.allocate(request, 20)
    stale = create_request("stale", list(range(20)))
    stale.block_ids = list(request.block_ids)  # a second holder that never took a reference

    block_manager.free(request)
    block_manager.free(request)  # the request no longer lists any block: a no-op
    assert block_manager.num_free_blocks == 4
    with pytest.raises(AssertionError, match="freed twice"):
        block_manager.free(stale)


# --- shared prefix blocks -------------------------------------------------------


def test_same_prefix_shares_block_ids_by_reference_count() -> None:
    block_manager = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
    first = create_request("first", prompt(prefix=PREFIX_A, tail_start=1, tail_len=5))
    second = create_request("second", prompt(prefix=PREFIX_A, tail_start=50, tail_len=5))

    assert admit(block_manager, first) == 0
    assert block_manager.num_used_blocks == 4
    assert admit(block_manager, second) == 3 * BLOCK_SIZE

    assert second.block_ids[:3] == first.block_ids[:3]
    assert second.block_ids[3] != first.block_ids[3]
    assert block_manager.num_used_blocks == 5
    assert [ref_count(block_manager, b) for b in first.block_ids] == [2, 2, 2, 1]

    block_manager.free(first)
    assert block_manager.num_used_blocks == 4  # the shared three are still held
    assert [ref_count(block_manager, b) for b in second.block_ids] == [1, 1, 1, 1]
    block_manager.free(second)
    assert (block_manager.num_used_blocks, block_manager.num_free_blocks) == (0, 10)


def test_only_computed_full_blocks_are_cached() -> None:
    block_manager = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
    first = create_request("first", prompt(prefix=PREFIX_A, tail_start=1, tail_len=5))
    assert block_manager.allocate(first, first.num_tokens)
    first.num_computed_tokens = BLOCK_SIZE + 3  # a chunk that ends inside block 2
    block_manager.cache_full_blocks(first)
    assert hit_tokens(block_manager, first.prompt_token_ids) == BLOCK_SIZE

    first.num_computed_tokens = first.num_tokens
    block_manager.cache_full_blocks(first)
    assert hit_tokens(block_manager, first.prompt_token_ids) == 3 * BLOCK_SIZE


def test_a_different_earlier_block_breaks_the_chain() -> None:
    block_manager = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
    admit(block_manager, create_request("first", [*PREFIX_A, 1]))
    # Same second and third blocks, different first block: keys chain, so no hit.
    changed = [PREFIX_A[0] + 1, *PREFIX_A[1:], 1]
    assert hit_tokens(block_manager, changed) == 0
    assert hit_tokens(block_manager, [*PREFIX_A[: 2 * BLOCK_SIZE], 5, 6]) == 2 * BLOCK_SIZE


@pytest.mark.parametrize(
    ("num_tokens", "expected_hit"),
    [(16, 0), (17, 16), (31, 16), (32, 16), (33, 32)],
)
def test_find_cached_prefix_never_covers_the_last_token(num_tokens: int, expected_hit: int) -> None:
    block_manager = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
    tokens = list(range(500, 540))
    admit(block_manager, create_request("writer", tokens))  # 2 full blocks cached
    assert hit_tokens(block_manager, tokens[:num_tokens]) == expected_hit


def test_exact_32_token_prompt_recomputes_its_last_block() -> None:
    block_manager = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
    tokens = list(range(500, 532))
    first = create_request("first", tokens)
    admit(block_manager, first)
    second = create_request("second", tokens)
    cached, num_cached = block_manager.find_cached_prefix(second)
    assert (cached, num_cached) == (first.block_ids[:1], 16)
    assert block_manager.allocate(second, 16, cached)
    assert second.block_ids[0] == first.block_ids[0]
    assert second.block_ids[1] != first.block_ids[1]


def test_prefix_caching_off_never_hits() -> None:
    block_manager = BlockManager(num_blocks=10, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    first = create_request("first", [*PREFIX_A, 1])
    second = create_request("second", [*PREFIX_A, 1])
    assert admit(block_manager, first) == 0
    assert block_manager.find_cached_prefix(second) == ([], 0)
    assert admit(block_manager, second) == 0
    assert not set(first.block_ids) & set(second.block_ids)
    block_manager.free(first)
    assert block_manager.find_cached_prefix(second) == ([], 0)
    block_manager.free(second)
    assert block_manager.num_free_blocks == 10


def test_a_request_asking_for_prompt_logprobs_never_hits() -> None:
    """Its prompt positions need logits, so none may come from the cache."""
    block_manager = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
    admit(block_manager, create_request("writer", [*PREFIX_A, 1]))
    reader = Request("reader", [*PREFIX_A, 1], SamplingParams(prompt_logprobs=0))
    assert block_manager.find_cached_prefix(reader) == ([], 0)


# --- LRU reuse of freed cached blocks ---------------------------------------------

LRU_BLOCK = 4
A = list(range(10, 18))  # two full blocks of 4
B = list(range(20, 28))


def test_freed_cached_blocks_stay_hittable_and_least_recently_freed_goes_first() -> None:
    block_manager = BlockManager(num_blocks=8, block_size=LRU_BLOCK)
    owner_a = create_request("a", [*A, 1])  # 2 cached blocks + 1 partial
    owner_b = create_request("b", [*B, 1])
    admit(block_manager, owner_a)
    admit(block_manager, owner_b)
    block_manager.free(owner_a)  # freed first: least recently used
    block_manager.free(owner_b)
    assert block_manager.num_free_blocks == 8
    assert hit_tokens(block_manager, [*A, 1]) == 8
    assert hit_tokens(block_manager, [*B, 1]) == 8

    def take(request_id: str, num_blocks: int) -> None:
        request = create_request(request_id, list(range(900, 900 + num_blocks * LRU_BLOCK)))
        assert block_manager.allocate(request, request.num_tokens)

    take("never-used-first", 2)  # the two blocks nobody has used yet
    assert (hit_tokens(block_manager, [*A, 1]), hit_tokens(block_manager, [*B, 1])) == (8, 8)

    take("evicts-a-tail", 2)  # A's partial block, then A's last full block
    assert (hit_tokens(block_manager, [*A, 1]), hit_tokens(block_manager, [*B, 1])) == (4, 8)

    take("evicts-a-head", 1)
    assert (hit_tokens(block_manager, [*A, 1]), hit_tokens(block_manager, [*B, 1])) == (0, 8)

    take("evicts-b-tail", 2)
    assert hit_tokens(block_manager, [*B, 1]) == 4
    assert block_manager.num_free_blocks == 1


def test_a_prefix_hit_makes_its_blocks_most_recently_used() -> None:
    block_manager = BlockManager(num_blocks=6, block_size=LRU_BLOCK)
    owner_a = create_request("a", [*A, 1])
    owner_b = create_request("b", [*B, 1])
    admit(block_manager, owner_a)
    admit(block_manager, owner_b)
    block_manager.free(owner_a)
    block_manager.free(owner_b)

    # Reuse A's prefix, then free it again: now B is the least recently freed.
    reader = create_request("reader", [*A, 2])
    assert admit(block_manager, reader) == 8
    block_manager.free(reader)

    filler = create_request("filler", list(range(900, 900 + 3 * LRU_BLOCK)))
    assert block_manager.allocate(filler, filler.num_tokens)
    assert hit_tokens(block_manager, [*A, 1]) == 8
    assert hit_tokens(block_manager, [*B, 1]) == 0


def test_a_held_cached_block_is_never_evicted() -> None:
    block_manager = BlockManager(num_blocks=4, block_size=LRU_BLOCK)
    owner = create_request("a", [*A, 1])
    admit(block_manager, owner)  # holds 3 of 4 blocks
    filler = create_request("filler", list(range(900, 900 + 2 * LRU_BLOCK)))
    assert not block_manager.allocate(filler, filler.num_tokens)
    assert hit_tokens(block_manager, [*A, 1]) == 8
