"""Shared fixtures: a tiny CLIP on disk, test images, and the app with its lifespan."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import pytest_asyncio
from httpx import ASGITransport, AsyncClient

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from fixtures.images import encode, make_image  # noqa: E402, F401 - re-exported to the tests
from fixtures.tiny_models import save_tiny_clip  # noqa: E402
from service.main import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the test, restored after (training on tiny models: a second
    thread only adds synchronisation; on a busy 2-core machine 43 s became 7 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture
def png() -> Callable[[int], bytes]:
    return lambda seed=0: encode(make_image(seed))


@pytest.fixture
def make_settings(tiny_clip_dir: Path, tmp_path: Path) -> Callable[..., Settings]:
    def build(**overrides: object) -> Settings:
        values: dict[str, object] = dict(
            clip_model=str(tiny_clip_dir),
            device=os.environ.get("PROMPTSWAP_TEST_DEVICE", "cpu"),  # bench/gpu.sh sets cuda
            dtype="float32",
            max_wait_ms=2.0,
            adapter_dir=tmp_path / "adapters",
        )
        values.update(overrides)
        return Settings(**values)

    return build


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[tuple[AsyncClient, object]]:
    """The real app with its lifespan running and models loaded, and a client for it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.runtime.wait_ready()
        transport = ASGITransport(app=app)
        async with AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, app


@pytest.fixture
async def client(make_settings: Callable[..., Settings]) -> AsyncIterator[AsyncClient]:
    async with running_app(make_settings()) as (client, _):
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_client(
    tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AsyncClient]:
    """One app for a whole module whose tests leave no state behind (its start-up is most of
    a test's time). The module runs its tests in one loop to share it:
    ``pytestmark = pytest.mark.asyncio(loop_scope="module")`` and a ``client`` fixture
    returning this one."""
    settings = Settings(
        clip_model=str(tiny_clip_dir),
        device="cpu",
        dtype="float32",
        max_wait_ms=2.0,
        adapter_dir=tmp_path_factory.mktemp("adapters"),
    )
    async with running_app(settings) as (client, _):
        yield client
