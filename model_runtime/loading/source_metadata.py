"""A model's config and tokenizer, read once per GGUF file.

transformers reads both from a GGUF file by parsing its metadata whole,
vocabulary and merges included: about 4 s each for a 49k-token vocabulary,
at every start. The first load saves them as a plain Hugging Face config and
tokenizer in the cache folder, keyed by the file's path, size and
modification time; later loads of the same file read those instead. A file
changed in place gets a new key, so nothing stale is served. (The weights
are still read from the file itself at every load.)
"""

import hashlib
import logging
import os
import shutil
from pathlib import Path

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from model_runtime.paths import cache_dir

logger = logging.getLogger(__name__)


def metadata_source(source: str | Path, from_gguf: dict[str, str]) -> tuple[str | Path, dict[str, str]]:
    """Where ``source``'s config and tokenizer load from (folder, keywords):
    for a GGUF file (``from_gguf``: ``{"gguf_file": name}`` in the folder
    ``source``) the saved folder once a load kept them, else as given."""
    if from_gguf:
        saved = metadata_dir(Path(source) / from_gguf["gguf_file"])
        if (saved / "config.json").is_file():
            return saved, {}
    return source, from_gguf


def keep_metadata(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, source: str | Path, from_gguf: dict[str, str]) -> None:
    """Save a GGUF file's config and tokenizer, as read from it before the
    model loads, for later loads; nothing for other sources or once saved."""
    if not from_gguf:
        return
    saved = metadata_dir(Path(source) / from_gguf["gguf_file"])
    if (saved / "config.json").is_file():
        return
    staging = saved.with_name(f"{saved.name}.tmp-{os.getpid()}")
    try:  # written aside, then renamed: a crash never leaves half a folder that later loads would trust
        saved.parent.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(saved)
    except OSError as error:  # an unwritable cache costs the next start the same seconds, nothing more
        logger.info("could not keep %s's config and tokenizer in %s: %s", from_gguf["gguf_file"], saved.parent, error)
        shutil.rmtree(staging, ignore_errors=True)


def metadata_dir(gguf_path: Path) -> Path:
    """Where ``gguf_path``'s config and tokenizer are kept: one folder per
    (resolved path, size, modification time)."""
    resolved = gguf_path.resolve()
    stat = resolved.stat()
    key = hashlib.sha256(f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf-metadata" / f"{resolved.stem}-{key}"
