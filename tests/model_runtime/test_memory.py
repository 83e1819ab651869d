"""What a loaded model holds: no mapping of its checkpoint left behind, tied
weights held once, and a GGUF embedding read from the file's blocks."""

import gc
import shutil
from pathlib import Path

import pytest

from model_runtime.loading.loader import load_model


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
