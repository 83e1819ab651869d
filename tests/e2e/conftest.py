"""Real ``tokenstep serve`` processes on a free loopback port."""

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``tokenstep serve`` in a subprocess; stopped by ``close()``."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, log_path: Path | None = None) -> None:
        self.args = args
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [
            sys.executable,
            "-c",
            "from server.cli import main; main()",
            "serve",
            *args,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self.log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tokenstep serve exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("tokenstep serve did not become healthy")

    def close(self) -> None:
        stop_process(self.process, timeout_s=20)
        if self.log is not subprocess.DEVNULL:
            self.log.close()


def stop_process(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def running_server(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """Start ``tokenstep serve ARGS``, yield it once ready, stop it afterwards."""
    server = ServerProcess(args, env=env, log_path=log_path)
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def tiny_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "tiny_server.log"
    yield from running_server([str(tiny_llama_dir), "--served-model-name", "tiny", "--kv-cache-memory", "64MiB", "--dtype", "float32"], log)


@pytest.fixture(scope="session")
def default_server(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``tokenstep serve`` with NO model argument: the embedded default."""
    log = tmp_path_factory.mktemp("logs") / "default_server.log"
    env = {"TOKENSTEP_CACHE_DIR": str(default_model_dir.parent), "TOKENSTEP_KV_CACHE_MEMORY": "256MiB"}
    yield from running_server([], log, env)


@pytest.fixture(scope="session")
def embedding_server(all_minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The real all-MiniLM-L6-v2 (a pooling model), served as ``minilm``."""
    log = tmp_path_factory.mktemp("logs") / "embedding_server.log"
    yield from running_server([str(all_minilm_dir), "--served-model-name", "minilm"], log)


API_KEY = "test-secret-key"
SMALL_BODY_LIMIT = 2048


@pytest.fixture(scope="session")
def guarded_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny model behind ``--api-key`` and a small ``--max-request-bytes``."""
    log = tmp_path_factory.mktemp("logs") / "guarded_server.log"
    args = [
        str(tiny_llama_dir),
        "--served-model-name",
        "tiny",
        "--kv-cache-memory",
        "16MiB",
        "--dtype",
        "float32",
        "--api-key",
        API_KEY,
        "--max-request-bytes",
        str(SMALL_BODY_LIMIT),
    ]
    yield from running_server(args, log)
