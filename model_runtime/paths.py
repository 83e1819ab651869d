"""Where tokenstep keeps what it builds on this machine: converted models
(``loading.default_model``) and compiled kernels (``kernels``), under one
cache folder. Shared by both so neither reaches into the other.

The folder comes from the server's settings (``TOKENSTEP_CACHE_DIR``,
``--cache-dir``) through ``server.engine_builder.configure_runtime``;
``model_runtime`` reads no environment variable of its own.
"""

from pathlib import Path

from platformdirs import user_cache_dir

_configured: Path | None = None


def configure(cache_dir: str | Path | None) -> None:
    """Use ``cache_dir`` from now on (None: the platform's user cache)."""
    global _configured
    _configured = Path(cache_dir) if cache_dir else None


def cache_dir() -> Path:
    """The configured folder, else the platform's user cache (``~/.cache/tokenstep``)."""
    return _configured or Path(user_cache_dir("tokenstep"))
