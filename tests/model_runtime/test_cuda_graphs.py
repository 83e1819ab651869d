"""Decode steps from CUDA graphs (model_runtime/cuda_graphs.py), proved on
the CPU: the Triton kernels run in Triton's interpreter, and each "graph"
runs its captured forward again on the same static buffers when replayed
(``ReplayedEagerly``), so everything but the recording itself is what runs
on a GPU: the padded batch sizes, the buffers each step writes, padding rows
that write no cache slot, and which steps replay. Greedy outputs equal
``generate``; ``make gpu-check`` runs the real graphs on CUDA."""

import pytest

from model_runtime import cuda_graphs
from model_runtime.attention import triton_paged
from model_runtime.loading.loader import load_model
from tests.model_runtime.test_parity import build, reference_outputs, run_engine

pytestmark = pytest.mark.skipif(
    not triton_paged.interpreted(),
    reason="the stand-in replays on CPU tensors in Triton's interpreter (no CUDA); on CUDA make gpu-check serves through real graphs",
)


class ReplayedEagerly:
    """A CUDA graph's stand-in: replaying runs the captured function again,
    writing into the output tensor capture returned."""

    replays: list[int] = []

    def __init__(self, pool: object | None) -> None:
        self.pool = pool

    def capture(self, function):
        self.function = function
        self.output = function()
        return self.output

    def replay(self) -> None:
        type(self).replays.append(self.output.shape[1])
        self.output.copy_(self.function())


@pytest.fixture
def on_graphs(monkeypatch):
    """Graphs as on CUDA: Triton attention and graph capture, on the CPU."""
    monkeypatch.setattr(triton_paged, "runs", lambda device: True)
    monkeypatch.setattr(cuda_graphs.GraphLimits, "possible", staticmethod(lambda device: True))
    monkeypatch.setattr(cuda_graphs, "CudaGraph", ReplayedEagerly)
    ReplayedEagerly.replays = []
    return ReplayedEagerly.replays


def test_decode_steps_replay_padded_graphs_and_equal_generate(on_graphs, tmp_path, default_model_dir):
    from tests.model_zoo import build as build_zoo_model

    model_dir = build_zoo_model("gpt-oss", tmp_path / "gpt-oss", default_model_dir)  # sliding windows and sinks
    loaded = load_model(model_dir, dtype="float32", device="cpu")
    prompts = [[(11 * n + 5 * i) % 49000 + 3 for i in range(n)] for n in (1, 3, 30, 7, 26)]

    def max_tokens(index: int) -> int:  # rows leave one by one, so the batch shrinks through the sizes
        return 5 + index

    expected = reference_outputs(model_dir, prompts, max_tokens)
    core = build(loaded, num_kv_blocks=64, max_num_batched_tokens=64, block_size=8, max_num_seqs=6)
    graphs = core.runner.decode_graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 6]
    captured = len(on_graphs)
    assert run_engine(core, prompts, max_tokens_of=max_tokens) == expected
    replayed = on_graphs[captured:]
    assert {1, 2, 4, 6} <= set(replayed), replayed  # 5 rows replay the graph of 6, 3 the graph of 4


def test_enforce_eager_and_prefill_steps_run_eagerly(on_graphs, tiny_llama_dir):
    loaded = load_model(tiny_llama_dir, dtype="float32", device="cpu")
    assert build(loaded, num_kv_blocks=64, enforce_eager=True).runner.decode_graphs is None
    core = build(loaded, num_kv_blocks=64, max_num_seqs=4)
    before = len(on_graphs)
    run_engine(core, [[5, 6, 7]], max_tokens_of=lambda index: 1)  # a prefill that samples its one token
    assert len(on_graphs) == before


class StaleGraph(ReplayedEagerly):
    """A graph that kept its capture's values: replaying changes nothing."""

    def replay(self) -> None:
        pass


def test_a_graph_that_does_not_follow_its_buffers_is_not_used(on_graphs, tiny_llama_dir, monkeypatch, caplog):
    """Checked at start against the eager forward on new inputs: a stale graph
    would answer every request with the capture's logits, so decode steps run
    eagerly instead, and say why."""
    monkeypatch.setattr(cuda_graphs, "CudaGraph", StaleGraph)
    loaded = load_model(tiny_llama_dir, dtype="float32", device="cpu")
    with caplog.at_level("WARNING"):
        core = build(loaded, num_kv_blocks=64, max_num_seqs=4)
    assert core.runner.decode_graphs is None
    assert "does not reproduce the eager forward" in caplog.text
    prompts = [[5, 6, 7], [9, 10]]
    assert run_engine(core, prompts, max_tokens_of=lambda index: 4) == reference_outputs(tiny_llama_dir, prompts, lambda index: 4)
