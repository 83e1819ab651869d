"""Fixtures for the server tests: the real engine on the tiny random Llama,
wrapped as ``Served``, and apps driven in-process through httpx.

``httpx.ASGITransport`` does not run the lifespan, so ``running()`` enters
``app.router.lifespan_context(app)`` itself (that is what starts and stops
the batcher). Each app gets its own ``DynamicBatcher`` over a fresh
``EngineCore``: stopping a batcher shuts its worker thread down for good.
"""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from batching.batcher import DynamicBatcher
from model_runtime.loading.loader import LoadedModel, load_model
from server.app import create_app
from server.engine_builder import EngineConfig, build_engine_core
from server.settings import Settings
from server.state import Served

BASE_URL = "http://tokenstep.test"
MODEL_NAME = "tiny"


def tiny_engine_config(model_dir: Path) -> EngineConfig:
    return EngineConfig(model=model_dir, dtype="float32", device="cpu", kv_cache_memory="64MiB")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_llama_dir: Path) -> LoadedModel:
    """The tiny model's weights and tokenizer, loaded once for every engine here."""
    return load_model(tiny_llama_dir, "float32", "cpu")


@pytest.fixture(scope="session")
def make_served(tiny_llama_dir: Path, tiny_loaded: LoadedModel) -> Callable[[], Served]:
    """Build a fresh (not yet started) real engine on the tiny model."""

    def build() -> Served:
        core = build_engine_core(tiny_engine_config(tiny_llama_dir), loaded=tiny_loaded)
        return Served(DynamicBatcher(core), core.tokenizer, MODEL_NAME, core.max_model_len)

    return build


@asynccontextmanager
async def running(app: FastAPI, **client_kwargs) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and yield an in-process client for it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=30, **client_kwargs) as client:
            yield client


class EngineApp:
    """An app serving the real tiny engine, its client and its ``Served``."""

    def __init__(self, app: FastAPI, client: httpx.AsyncClient, served: Served) -> None:
        self.app = app
        self.client = client
        self.served = served

    @property
    def batcher(self) -> DynamicBatcher:
        return self.served.batcher


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine_app(make_served: Callable[[], Served]) -> AsyncIterator[EngineApp]:
    """One running app (no API key) per test module, over the real engine."""
    served = make_served()
    app = create_app(Settings(api_key=None), ready=served)
    async with running(app) as client:
        yield EngineApp(app, client, served)
