"""Fixtures for the reliability tests: the tiny model's weights (loaded once
for every in-process engine) and real ``tokenstep serve`` processes."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from model_runtime.loading.loader import LoadedModel, load_model
from tests.e2e.conftest import ServerProcess

API_KEY = "reliability-key-4c1e9b27"
SMALL_QUEUE_LEN = 4
SMALL_MAX_NUM_SEQS = 2


@pytest.fixture(scope="session")
def tiny_weights(tiny_llama_dir: Path) -> LoadedModel:
    return load_model(tiny_llama_dir, "float32", "cpu")


def start_server(args: list[str], log_path: Path) -> ServerProcess:
    server = ServerProcess(args, log_path=log_path)
    try:
        server.wait_ready()
    except BaseException:
        server.close()
        raise
    return server


@pytest.fixture(scope="session")
def storm_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny model with default scheduling limits (disconnect storm, soak)."""
    log = tmp_path_factory.mktemp("logs") / "storm_server.log"
    server = start_server([str(tiny_llama_dir), "--served-model-name", "tiny", "--kv-cache-memory", "64MiB", "--dtype", "float32"], log)
    yield server
    server.close()


@pytest.fixture(scope="session")
def small_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A small queue and running set behind an API key, logging at debug level."""
    log = tmp_path_factory.mktemp("logs") / "small_server.log"
    args = [
        str(tiny_llama_dir), "--served-model-name", "tiny", "--kv-cache-memory", "16MiB", "--dtype", "float32",
        "--max-queue-len", str(SMALL_QUEUE_LEN), "--max-num-seqs", str(SMALL_MAX_NUM_SEQS),
        "--api-key", API_KEY, "--log-level", "debug",
    ]  # fmt: skip
    server = start_server(args, log)
    server.log_path = log
    yield server
    server.close()
