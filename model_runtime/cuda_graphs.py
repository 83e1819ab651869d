"""Decode steps replayed from CUDA graphs (``DecodeGraphs``).

An eager decode step on a GPU is thousands of kernel launches, each a few
microseconds of Python and driver time, for a few microseconds of work: one
stream's step is launch-bound. A CUDA graph records the launches of one
forward once and replays them with one call. So at start, for each padded
batch size (``GRAPH_BATCH_SIZES`` up to ``--max-num-seqs``), the model's
forward over that many decode rows is captured, its inputs and attention
metadata (``attention.triton_paged.TritonStep``) reading from static
buffers. A decode-only step of B rows then writes its token ids, positions,
context lengths, slots and block tables into those buffers (padding rows
write no cache slot and see no keys) and replays the smallest graph of at
least B rows; its logits are the first B rows of that graph's output.

Steps with prefill chunks, drafts or prompt logprobs, and batches past the
largest graph, run eagerly. ``--enforce-eager`` turns graphs off.

On the CPU there are no CUDA graphs; the tests replace ``CudaGraph`` with a
stand-in that runs the captured function again on the same buffers, which
proves everything here but the recording itself (tests/model_runtime/
test_cuda_graphs.py); ``make gpu-check`` runs the real ones.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model_runtime.attention.context import SequenceChunk, StepContext
from model_runtime.attention.triton_paged import TritonStep
from model_runtime.kv_cache import PagedKVCache

logger = logging.getLogger(__name__)

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)

# What a graph runs: (input_ids [1, G], position_ids [1, G], context, rows [G]) -> logits [1, G, vocab].
StepFunction = Callable[[torch.Tensor, torch.Tensor, StepContext, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class GraphLimits:
    """What the graphs must hold: up to ``max_num_seqs`` rows, each with a
    context of up to ``max_model_len`` tokens."""

    max_num_seqs: int
    max_model_len: int

    @staticmethod
    def possible(device: torch.device) -> bool:
        return device.type == "cuda"


class CudaGraph:
    """One captured forward: ``capture`` records ``function`` (run once
    before, so that Triton compiles outside the recording) and returns its
    output tensor; ``replay`` writes a new output into that tensor."""

    def __init__(self, pool: object | None) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, function: Callable[[], torch.Tensor]) -> torch.Tensor:
        function()
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph, pool=self.pool):
            output = function()
        if self.pool is None:
            self.pool = self.graph.pool()
        return output

    def replay(self) -> None:
        self.graph.replay()


class DecodeGraphs:
    """Captured decode forwards for batch sizes up to ``max_num_seqs``, over
    block tables of up to ``max_blocks_per_seq`` blocks."""

    def __init__(self, run: StepFunction, kv_cache: PagedKVCache, limits: GraphLimits) -> None:
        largest = min(limits.max_num_seqs, GRAPH_BATCH_SIZES[-1])
        self.sizes = sorted({size for size in GRAPH_BATCH_SIZES if size < largest} | {largest})
        self.block_size = kv_cache.block_size
        self.max_blocks_per_seq = -(-limits.max_model_len // kv_cache.block_size)
        max_blocks_per_seq = self.max_blocks_per_seq
        device = kv_cache.key_caches[0].device
        # Static inputs: token ids and positions (int64), then the kernels' metadata (int32).
        self.ids = torch.zeros(2, largest, dtype=torch.long, device=device)  # [input_ids; position_ids]
        self.seq_lens = torch.zeros(largest, dtype=torch.int32, device=device)
        self.slots = torch.full((largest,), -1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(largest, max_blocks_per_seq, dtype=torch.int32, device=device)
        rows = torch.arange(largest, dtype=torch.int32, device=device)
        ones, zeros = torch.ones_like(rows), torch.zeros_like(rows)
        self.rows = rows.long()
        self.graphs: dict[int, tuple[CudaGraph, torch.Tensor]] = {}
        contexts: dict[int, StepContext] = {}
        started, pool = time.monotonic(), None
        for size in reversed(self.sizes):  # the largest first: the smaller ones reuse its memory
            step = TritonStep(
                self.seq_lens[:size],
                rows[:size],  # each row is its own sequence
                ones[:size],  # of one new token
                rows[:size],  # and its own tile
                zeros[:size],
                self.block_tables[:size],
                self.slots[:size],
                block_q=1,
            )
            # The kernels read ``triton``; the int32 slots stand in for the Python paths' int64 slot mapping.
            context = StepContext(kv_cache.key_caches, kv_cache.value_caches, self.slots[:size], size, None, None, None, [], triton=step)
            graph = CudaGraph(pool)
            output = graph.capture(
                lambda size=size, context=context: run(self.ids[0:1, :size], self.ids[1:2, :size], context, self.rows[:size])
            )
            pool = graph.pool
            self.graphs[size] = (graph, output[0])  # [size, vocab]
            contexts[size] = context
        self._check_replays(run, contexts)
        logger.info("CUDA graphs: decode steps of %s rows captured in %.1f s", ", ".join(map(str, self.sizes)), time.monotonic() - started)

    def _check_replays(self, run: StepFunction, contexts: dict[int, StepContext]) -> None:
        """Each graph must give what the eager forward gives for inputs other
        than those it was captured with: one that kept a value of its capture
        instead of reading the buffers would answer wrong, so it raises here
        (the runner then runs decode steps eagerly)."""
        for size, (graph, output) in self.graphs.items():
            positions = [3 + row % 5 for row in range(size)]  # keys of block 0, read by every row
            self.ids[:, :size].copy_(torch.tensor([[1 + row for row in range(size)], positions]))
            self.seq_lens[:size].copy_(torch.tensor([p + 1 for p in positions], dtype=torch.int32))
            self.slots[:size].fill_(-1)  # writing nothing
            graph.replay()
            replayed = output.clone()
            eager = run(self.ids[0:1, :size], self.ids[1:2, :size], contexts[size], self.rows[:size])[0]
            if not torch.allclose(replayed.float(), eager.float(), rtol=1e-3, atol=1e-3 * max(eager.abs().max().item(), 1.0)):
                raise RuntimeError(f"the graph of {size} rows does not reproduce the eager forward on new inputs")
        self.seq_lens.zero_()

    def fits(self, chunks: list[SequenceChunk], kept_rows: list[int]) -> bool:
        """Whether this step is one a graph serves: decode rows only, each
        row's logits kept in order, no more rows than the largest graph."""
        return (
            len(chunks) <= self.sizes[-1]
            and all(len(chunk.token_ids) == 1 and len(chunk.block_ids) <= self.max_blocks_per_seq for chunk in chunks)
            and kept_rows == list(range(len(chunks)))
        )

    def run(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        """Logits ``[B, vocab]`` of a step ``fits`` accepted."""
        count = len(chunks)
        size = next(size for size in self.sizes if size >= count)
        graph, output = self.graphs[size]
        positions = [chunk.num_computed_tokens for chunk in chunks]
        width = max(len(chunk.block_ids) for chunk in chunks)
        slots = [chunk.block_ids[p // self.block_size] * self.block_size + p % self.block_size for chunk, p in zip(chunks, positions)]
        padding = size - count
        ids = torch.tensor([[chunk.token_ids[0] for chunk in chunks] + [0] * padding, positions + [0] * padding])
        self.ids[:, :size].copy_(ids, non_blocking=True)
        metadata = torch.tensor([[p + 1 for p in positions] + [0] * padding, slots + [-1] * padding], dtype=torch.int32)
        self.seq_lens[:size].copy_(metadata[0], non_blocking=True)  # padded rows: no keys to see,
        self.slots[:size].copy_(metadata[1], non_blocking=True)  # and no slot to write
        tables = torch.tensor([chunk.block_ids + [0] * (width - len(chunk.block_ids)) for chunk in chunks], dtype=torch.int32)
        self.block_tables[:count, :width].copy_(tables, non_blocking=True)
        graph.replay()
        return output[:count]
