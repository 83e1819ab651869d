"""Where tokenstep keeps what it builds on this machine: converted models
(``loading.default_model``) and compiled kernels (``kernels``), under one
cache folder. Shared by both so neither reaches into the other."""

import os
from pathlib import Path

from platformdirs import user_cache_dir

CACHE_ENV = "TOKENSTEP_CACHE_DIR"


def cache_dir() -> Path:
    """``$TOKENSTEP_CACHE_DIR``, else the platform's user cache (``~/.cache/tokenstep``)."""
    return Path(os.environ.get(CACHE_ENV) or user_cache_dir("tokenstep"))
