"""Shared fixtures: the tiny model, throwaway databases, and a real gateway served over HTTP."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.backends.local import LocalBackend, warm_up
from gateway.middleware import DirectRoutes
from gateway.settings import Settings
from inference.runner import HiDreamRunner
from inference.serving import GenerationQueue
from inference.tiny import build_tiny_pipeline
from inference.variants import VARIANTS
from inference.worker import create_worker_app
from tests.fakes.fal import FakeFal
from tests.fakes.server import ServerThread
from tests.s3 import MotoS3

ADMIN_TOKEN = "test-admin-token"
WORKER_TOKEN = "worker-token"
POSTGRES_ADMIN_URL = os.environ.get("HDG_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
FAST = {"model": "hidream-i1-fast", "num_inference_steps": 2}


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def runner(tiny_root: Path) -> HiDreamRunner:
    loaded = HiDreamRunner.load(tiny_root / "pipeline", llama_path=tiny_root / "llama")
    warm_up(loaded, variant="fast")  # once, here: every local backend on it is then up at once, in any test order
    return loaded


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    name = f"hdg_test_{secrets.token_hex(6)}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs twice: on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"


@dataclass
class Gateway:
    """A running gateway and helpers to talk to it over real HTTP."""

    url: str
    settings: Settings
    backend: LocalBackend
    client: httpx.Client
    tenants_made: int = 0

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        return self.client.request(method, path, headers=headers, **kwargs)

    def create_tenant(self, name: str | None = None, **fields: Any) -> dict[str, Any]:
        """Create a tenant through the admin API; returns its JSON (with ``api_key``).

        Names are unique per gateway: without one, each call gets its own (``acme``, ``acme-2``, ...).
        """
        if name is None:
            self.tenants_made += 1
            name = "acme" if self.tenants_made == 1 else f"acme-{self.tenants_made}"
        resp = self.admin("POST", "/admin/tenants", json={"name": name, **fields})
        assert resp.status_code == 201, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def generate(self, key: str, **body: Any) -> httpx.Response:
        payload = {**FAST, "prompt": "a red fox in the snow", **body}
        return self.client.post("/v1/images/generations", json=payload, headers={"Authorization": f"Bearer {key}"})


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def make_gateway(runner: HiDreamRunner, tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start gateways (on a given database URL, with settings overrides); all are stopped after the test."""
    stack: list[tuple[ServerThread, LocalBackend, httpx.Client]] = []

    def start(
        database_url: str,
        *,
        queue_size: int = 8,
        backend: Any = None,
        from_settings: bool = False,
        direct: bool = True,
        **overrides: Any,
    ) -> Gateway:
        fields = {"data_dir": tmp_path / f"data{len(stack)}", "admin_token": ADMIN_TOKEN} | overrides
        settings = Settings(database_url=database_url, **fields)
        if backend is None:
            backend = LocalBackend(lambda: runner, variants=frozenset(VARIANTS), queue_size=queue_size)
        chain = backend if isinstance(backend, list) else [backend]  # several, in routing-order
        for b in chain:
            if isinstance(b, LocalBackend):
                b.start()
        backend = chain[-1] if isinstance(backend, list) else backend
        # from_settings: the app builds its backends from HDG_BACKENDS itself (remote ones, in these tests).
        app = create_app(settings, backends=None if from_settings else chain)
        if not direct:  # every route through FastAPI's router, the images route too (see DirectRoutes)
            app.user_middleware = [m for m in app.user_middleware if m.cls is not DirectRoutes]
        server = ServerThread(app).start()
        url = f"http://127.0.0.1:{server.port}"
        client = httpx.Client(base_url=url, timeout=120)
        stack.append((server, backend, client))
        return Gateway(url=url, settings=settings, backend=backend, client=client)

    yield start
    for server, backend, client in reversed(stack):
        client.close()
        server.stop()
        asyncio.run(backend.aclose())


@pytest.fixture
def gateway(make_gateway: GatewayFactory, database_url: str) -> Gateway:
    """A gateway on SQLite, then (second run) on PostgreSQL."""
    return make_gateway(database_url)


@pytest.fixture
def sqlite_gateway(make_gateway: GatewayFactory, sqlite_url: str) -> Gateway:
    """A gateway on SQLite only, for behaviour that does not depend on the database."""
    return make_gateway(sqlite_url)


@pytest.fixture
def worker_app(runner: HiDreamRunner) -> Iterator[ServerThread]:
    """The self-hosted worker protocol on the tiny model, served over HTTP with token ``worker-token``."""
    queue = GenerationQueue(lambda: runner, queue_size=4)
    app = create_worker_app(queue, token=WORKER_TOKEN, variants=frozenset(VARIANTS))
    with ServerThread(app) as server:
        yield server


@pytest.fixture
def fal() -> Iterator[FakeFal]:
    """The fake fal queue API on a loopback port."""
    with FakeFal() as fake:
        yield fake


def fal_only(fal: FakeFal) -> dict[str, Any]:
    """Settings for a gateway whose one backend is ``fal`` (outputs allowed from the fake's own origin)."""
    return {
        "backends": ["fal"],
        "fal_key": fal.key,
        "fal_base_url": fal.url,
        "fal_output_hosts": [fal.url],
        "provider_poll_seconds": 0.05,
    }


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """A local S3-compatible server for the whole run (tests/s3.py); each test takes its own bucket from it."""
    with MotoS3() as server:
        yield server
