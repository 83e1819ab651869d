"""What a loaded model holds: no mapping of its checkpoint left behind, tied
weights held once, one layout per float32 weight, and a GGUF embedding read
from the file's blocks."""

import gc
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from model_runtime.loading.loader import held_bytes, load_model
from model_runtime.weights import layout as weight_layout
from model_runtime.weights.layout import FLOAT32_LAYOUTS


def mapped(path: Path) -> bool:
    """Whether this process still maps ``path`` (Linux: /proc/self/maps)."""
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_no_view_of_the_checkpoint_outlives_the_load(tiny_llama_dir: Path, tmp_path: Path, quantization: str):
    """transformers loads safetensors as views of one mapping of the file; a
    single tensor left viewing it (a norm, the embedding) kept every page the
    load touched resident: 513 MiB on the default model."""
    model_dir = Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))  # a path no other test maps
    checkpoint = model_dir / "model.safetensors"
    loaded = load_model(model_dir, "float32", "cpu", quantization)
    gc.collect()
    assert not mapped(checkpoint)
    assert loaded.model.get_input_embeddings().weight.shape[0] == loaded.vocab_size  # the model is alive while checked


@pytest.mark.parametrize("layout", FLOAT32_LAYOUTS)
def test_a_float32_model_holds_each_weight_once_in_every_layout(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, layout: str):
    """Whichever layout the load-time probe keeps, the served model holds no
    more than the checkpoint's tensors (the tied LM head included): two
    layouts per weight held the default model's 540 MB twice."""
    monkeypatch.setattr(weight_layout, "fastest_overall", lambda times_s: layout)
    loaded = load_model(tiny_llama_dir, "float32", "cpu")
    checkpoint = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    checkpoint_bytes = sum(
        t.numel() * t.element_size() for t in {t.data_ptr(): t for t in [*checkpoint.parameters(), *checkpoint.buffers()]}.values()
    )
    assert held_bytes(loaded.model) <= checkpoint_bytes
