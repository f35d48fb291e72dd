"""Image storage: the local directory and the S3-compatible bucket behind one interface, and replicas sharing it.

The S3 tests run against moto in server mode (tests/s3.py) over real HTTP, and against a server that never answers.
A store that cannot be used (a missing bucket, a hung endpoint) must fail fast and say so: a 503 and an unready
gateway, never a 404 that reads as deleted files. The replica tests start two real gateway processes on one
PostgreSQL database, each with its own data directory, and check that an image made through one is served by the
other: through a bucket it is, through separate local directories it is not.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import os
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from PIL import Image
from sqlalchemy import func, select

from gateway.backends.base import ImageJob, ImageResult
from gateway.health import HealthBoard
from gateway.jobs import JobRunner
from gateway.settings import Settings, default_backend_costs
from gateway.storage.db import open_database, session_factory
from gateway.storage.files import (
    FileMissing,
    LocalFileStore,
    S3FileStore,
    SavedFile,
    StorageUnavailable,
    build_file_store,
)
from gateway.storage.models import Prediction, StoredFile
from tests.conftest import GatewayFactory
from tests.fakes.fal import FakeFal
from tests.fakes.server import make_image
from tests.gateway_process import GatewayProcess
from tests.held_job import insert_held_job
from tests.s3 import SECRET_ACCESS_KEY, Bucket, MotoS3, SilentServer

ADMIN_TOKEN = "storage-admin-token"
PNG = make_image(256, 256, "png", seed=7)


@pytest.fixture
def bucket(moto_s3: MotoS3) -> Bucket:
    return moto_s3.bucket()


def s3_file_store(bucket: Bucket, prefix: str = "") -> S3FileStore:
    store = build_file_store(Settings(**bucket.settings(prefix=prefix)))
    assert isinstance(store, S3FileStore)
    return store


# --- the S3 store ----------------------------------------------------------------------------------------------


def test_s3_store_round_trips_a_png_under_its_prefix_and_deletes_it(bucket: Bucket) -> None:
    store = s3_file_store(bucket, prefix="hdg/")

    async def scenario() -> None:
        saved = await store.save(tenant_id="ten_a", file_id="file_1", content_type="image/png", data=PNG)
        # The database keeps the store-relative path; the prefix is the store's business.
        assert saved.path == "ten_a/file_1.png"
        assert (saved.size_bytes, saved.sha256) == (len(PNG), hashlib.sha256(PNG).hexdigest())
        assert bucket.keys() == ["hdg/ten_a/file_1.png"]
        assert bucket.get("hdg/ten_a/file_1.png") == (PNG, "image/png")  # as another S3 client sees it

        data = await store.read(saved.path)
        assert data == PNG
        assert Image.open(io.BytesIO(data)).format == "PNG"

        await store.delete(saved.path)
        assert bucket.keys() == []
        await store.delete(saved.path)  # deleting what is gone is fine
        with pytest.raises(FileMissing):
            await store.read(saved.path)
        await store.aclose()

    asyncio.run(scenario())


def test_s3_store_saves_many_at_once_and_reports_missing_keys_as_file_missing(bucket: Bucket) -> None:
    store = s3_file_store(bucket)
    images = {f"file_{i}": make_image(64, 64, "png", seed=i) for i in range(6)}

    async def scenario() -> None:
        saved = await asyncio.gather(
            *(
                store.save(tenant_id="ten_b", file_id=fid, content_type="image/png", data=data)
                for fid, data in images.items()
            )
        )
        assert bucket.keys() == sorted(f"ten_b/{fid}.png" for fid in images)  # no prefix: keys start at the tenant
        assert [await store.read(s.path) for s in saved] == list(images.values())
        with pytest.raises(FileMissing):
            await store.read("ten_b/file_never_written.png")
        with pytest.raises(LookupError):  # FileMissing is a LookupError for callers that catch broadly
            await store.read("ten_other/file_0.png")

    asyncio.run(scenario())


def test_s3_settings_that_cannot_work_are_refused_naming_the_setting(bucket: Bucket) -> None:
    with pytest.raises(ValueError, match="HDG_S3_BUCKET"):
        build_file_store(Settings(storage="s3"))
    with pytest.raises(ValueError, match="HDG_S3_SECRET_ACCESS_KEY"):
        build_file_store(Settings(**bucket.settings() | {"s3_secret_access_key": None}))
    with pytest.raises(ValueError, match="HDG_S3_ACCESS_KEY_ID"):
        build_file_store(Settings(**bucket.settings() | {"s3_access_key_id": None}))


def test_the_default_store_is_the_data_dirs_files_directory(tmp_path: Path) -> None:
    store = build_file_store(Settings(data_dir=tmp_path))
    assert isinstance(store, LocalFileStore) and store.root == tmp_path / "files"


# --- the local store -------------------------------------------------------------------------------------------


def test_local_store_round_trips_and_refuses_paths_outside_its_root(tmp_path: Path) -> None:
    store = LocalFileStore(tmp_path / "files")

    async def scenario() -> None:
        saved = await store.save(tenant_id="ten_a", file_id="file_1", content_type="image/png", data=PNG)
        assert saved.path == "ten_a/file_1.png" and saved.sha256 == hashlib.sha256(PNG).hexdigest()
        assert (tmp_path / "files" / "ten_a" / "file_1.png").read_bytes() == PNG
        assert await store.read(saved.path) == PNG
        for escape in ("../../etc/passwd", "ten_a/../../outside.png", "/etc/passwd"):
            with pytest.raises(ValueError, match="escapes"):
                await store.read(escape)
            with pytest.raises(ValueError, match="escapes"):
                await store.delete(escape)
        await store.delete(saved.path)
        await store.delete(saved.path)
        with pytest.raises(FileMissing):
            await store.read(saved.path)
        await store.aclose()

    asyncio.run(scenario())


def test_local_store_readers_see_a_whole_file_or_none_while_it_is_rewritten(tmp_path: Path) -> None:
    """Writes go to a temporary name and are renamed: a concurrent reader never gets a partial image."""
    store = LocalFileStore(tmp_path / "files")
    versions = [os.urandom(4 * 1024 * 1024), os.urandom(4 * 1024 * 1024)]
    seen: list[bytes | None] = []

    async def reader(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                seen.append(await store.read("ten_a/file_1.png"))
            except FileMissing:
                seen.append(None)

    async def scenario() -> None:
        stop = asyncio.Event()
        readers = [asyncio.create_task(reader(stop)) for _ in range(4)]
        for i in range(20):
            await store.save(tenant_id="ten_a", file_id="file_1", content_type="image/png", data=versions[i % 2])
        stop.set()
        await asyncio.gather(*readers)

    asyncio.run(scenario())
    whole = [s for s in seen if s is not None]
    assert whole and all(s in versions for s in whole), {len(s) for s in whole}
    assert [p.name for p in (tmp_path / "files" / "ten_a").iterdir()] == ["file_1.png"]  # no temporary files left


# --- a store that cannot be used ------------------------------------------------------------------------------


def test_a_store_that_never_answers_fails_each_request_within_15_seconds() -> None:
    """Per-request timeout: a hung endpoint costs a read, a save or a check 10 s, not obstore's default minute."""
    with SilentServer() as silent:
        store = build_file_store(Settings(**silent.settings()))

        async def scenario() -> list[Any]:
            async with asyncio.timeout(30):  # without the per-request timeout this would wait a minute or more
                return await asyncio.gather(
                    store.read("ten_a/file_1.png"),
                    store.save(tenant_id="ten_a", file_id="file_2", content_type="image/png", data=PNG),
                    store.check(),
                    return_exceptions=True,
                )

        started = time.monotonic()
        outcomes = asyncio.run(scenario())
        elapsed = time.monotonic() - started
        assert all(isinstance(o, StorageUnavailable) for o in outcomes), outcomes
        assert [o.reason for o in outcomes] == ["no answer within 10 s"] * 3
        assert str(outcomes[0]) == "Image storage is unavailable; try again later. (no answer within 10 s)"
        assert 9 < elapsed < 15, elapsed
        assert silent.accepted == 3  # one connection each: a request that timed out is not tried again


def test_a_missing_bucket_is_storage_unavailable_never_missing_files(bucket: Bucket) -> None:
    """A missing key is FileMissing (a 404); a missing bucket is StorageUnavailable, whatever the operation."""
    store = s3_file_store(bucket, prefix="hdg/")

    async def scenario() -> None:
        await store.check()  # the bucket is there
        assert bucket.keys() == []  # and checking wrote nothing
        with pytest.raises(FileMissing):
            await store.read("ten_a/file_never_written.png")

        bucket.remove()
        failures = [
            store.read("ten_a/file_never_written.png"),
            store.save(tenant_id="ten_a", file_id="file_1", content_type="image/png", data=PNG),
            store.delete("ten_a/file_1.png"),
            store.check(),
        ]
        for failure in failures:
            with pytest.raises(StorageUnavailable) as caught:
                await failure
            assert not isinstance(caught.value, LookupError)
            assert caught.value.reason == "the bucket does not exist (NoSuchBucket)"
            assert SECRET_ACCESS_KEY not in str(caught.value)
            assert (caught.value.status_code, caught.value.code) == (503, "storage_unavailable")

    asyncio.run(scenario())


def test_the_local_store_check_creates_its_directory_and_fails_where_it_cannot(tmp_path: Path) -> None:
    fresh = LocalFileStore(tmp_path / "data" / "files")
    asyncio.run(fresh.check())
    assert (tmp_path / "data" / "files").is_dir()  # a fresh data dir is ready before its first image

    (tmp_path / "blocker").write_text("a file where the data dir should be")
    blocked = LocalFileStore(tmp_path / "blocker" / "files")
    with pytest.raises(StorageUnavailable, match="cannot create") as caught:
        asyncio.run(blocked.check())
    assert caught.value.reason.startswith(f"cannot create {tmp_path / 'blocker' / 'files'}: ")


def test_a_missing_bucket_is_a_503_and_makes_the_gateway_unready(
    make_gateway: GatewayFactory, sqlite_url: str, bucket: Bucket
) -> None:
    gw = make_gateway(sqlite_url, **bucket.settings(prefix="hdg/"))
    ready = gw.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["storage"] == "ok"
    key = gw.create_tenant()["api_key"]
    auth = {"Authorization": f"Bearer {key}"}
    made = gw.generate(key)
    assert made.status_code == 200, made.text
    (entry,) = made.json()["data"]

    bucket.remove()
    unavailable = {
        "message": "Image storage is unavailable; try again later.",
        "type": "server_error",
        "param": None,
        "code": "storage_unavailable",
    }
    for resp in (
        httpx.get(entry["url"]),
        gw.client.get(f"/v1/files/{entry['file_id']}/content", headers=auth),
    ):
        assert resp.status_code == 503, resp.text  # not 404 "no longer stored": the file is not gone, the bucket is
        assert resp.json() == {"error": unavailable}

    unready = gw.client.get("/readyz")
    assert unready.status_code == 503
    assert unready.json()["status"] == "unavailable"
    assert unready.json()["checks"]["storage"] == "error: the bucket does not exist (NoSuchBucket)"
    assert unready.json()["checks"]["database"] == "ok"

    failed = gw.generate(key)  # the backend made the image; storing it failed
    assert failed.status_code == 503, failed.text
    error = failed.json()["error"]
    assert {k: v for k, v in error.items() if k != "attempts"} == unavailable  # plus the attempts, as every failure


# --- a job whose images are saved in part --------------------------------------------------------------------------


class OneSaveFails:
    """A real S3 store, except that saving the file ``fails`` is refused at once (while the others are in flight)."""

    def __init__(self, store: S3FileStore, *, fails: int, deletes_fail: bool = False) -> None:
        self.store = store
        self.fails = fails
        self.deletes_fail = deletes_fail
        self.saves = 0
        self.in_flight = 0

    async def save(self, *, tenant_id: str, file_id: str, content_type: str, data: bytes) -> SavedFile:
        self.saves += 1
        if self.saves == self.fails:
            raise StorageUnavailable("S3 error SlowDown")
        self.in_flight += 1
        try:
            return await self.store.save(tenant_id=tenant_id, file_id=file_id, content_type=content_type, data=data)
        finally:
            self.in_flight -= 1

    async def read(self, path: str) -> bytes:
        return await self.store.read(path)

    async def delete(self, path: str) -> None:
        if self.deletes_fail:
            raise StorageUnavailable("S3 error AccessDenied")
        await self.store.delete(path)

    async def check(self) -> None:
        await self.store.check()

    async def aclose(self) -> None:
        await self.store.aclose()


class ThreeImages:
    """A backend that makes three PNGs per job."""

    name = kind = "local"
    variants = frozenset({"fast"})

    async def generate(self, job: ImageJob, *, timeout: float) -> ImageResult:
        images = [make_image(64, 64, "png", seed=i) for i in range(3)]
        return ImageResult(images, "image/png", 64, 64, job.seed)

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


async def _held_job(runner: JobRunner) -> Prediction:
    """A three-image job, leased to ``run_me`` as if it had just been claimed."""
    job = ImageJob(variant="fast", prompt="three foxes", width=64, height=64, seed=1)
    return await insert_held_job(runner.sessions, job, n=3)


@pytest.mark.parametrize("deletes_fail", [False, True], ids=["cleaned-up", "cleanup-fails"])
def test_when_one_of_n_saves_fails_the_others_are_deleted_and_the_save_error_is_reported(
    sqlite_url: str, bucket: Bucket, deletes_fail: bool, caplog: pytest.LogCaptureFixture
) -> None:
    files = OneSaveFails(s3_file_store(bucket), fails=2, deletes_fail=deletes_fail)

    async def scenario() -> None:
        async with open_database(sqlite_url) as engine:
            backend = ThreeImages()
            health = HealthBoard()
            health.register(backend.name, max_in_flight=4)
            runner = JobRunner(
                sessions=session_factory(engine),
                backends=[backend],
                files=files,
                prices={"hidream-i1-fast": Decimal("0.01")},
                costs=default_backend_costs(),
                gpu_usd_per_second=Decimal("0.001"),
                health=health,
                attempt_timeout=30,
            )
            p = await _held_job(runner)
            finished = await runner.execute(p, owner="run_me", allowed=None, why=lambda: None)
            assert files.in_flight == 0  # every save had ended before the job did: none can land afterwards
            assert finished.prediction.status == "failed"
            assert isinstance(finished.error, StorageUnavailable)  # the save's error, not the clean-up's
            assert finished.error.reason == "S3 error SlowDown"
            async with runner.sessions() as session:
                assert await session.scalar(select(func.count()).select_from(StoredFile)) == 0

    with caplog.at_level(logging.WARNING, logger="hidream_gateway.jobs"):
        asyncio.run(scenario())
    if deletes_fail:  # best effort: the two that landed stay, and each is logged for someone to remove
        assert len(bucket.keys()) == 2
        assert sum("could not delete" in r.getMessage() for r in caplog.records) == 2
    else:
        assert bucket.keys() == []


# --- two replicas --------------------------------------------------------------------------------------------------


@pytest.fixture
def replicas(fal: FakeFal, postgres_url: str, tmp_path: Path) -> Iterator[Any]:
    """Start two gateway processes on one database, each with its own data dir; ``extra`` env is shared."""
    started: list[GatewayProcess] = []

    def start(extra: dict[str, str]) -> tuple[GatewayProcess, GatewayProcess]:
        for name in ("a", "b"):  # one after the other: the first runs the migrations
            env = {
                "HDG_DATA_DIR": str(tmp_path / f"data-{name}"),
                "HDG_DATABASE_URL": postgres_url,
                "HDG_ADMIN_TOKEN": ADMIN_TOKEN,
                "HDG_URL_SIGNING_SECRET": "replicas-share-this-secret-of-32-chars-or-more",
                "HDG_BACKENDS": "fal",
                "FAL_KEY": fal.key,
                "HDG_FAL_BASE_URL": fal.url,
                "HDG_FAL_OUTPUT_HOSTS": fal.url,
                "HDG_PROVIDER_POLL_SECONDS": "0.05",
            } | extra
            gw = GatewayProcess(env, log_path=tmp_path / f"{name}.log")
            started.append(gw)
            gw.start()
        return started[0], started[1]

    yield start
    for gw in started:
        gw.terminate()  # a clean shutdown, so the store's aclose runs too
        print(f"==== {gw.log_path.name} ====\n{gw.log_tail()}")


def new_key(gw: GatewayProcess) -> str:
    resp = httpx.post(
        f"{gw.url}/admin/tenants", json={"name": "acme"}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert resp.status_code == 201, resp.text
    key: str = resp.json()["api_key"]
    return key


def on(gw: GatewayProcess, url: str) -> str:
    """``url`` (a signed URL another replica minted) sent to ``gw`` instead."""
    parts = urlsplit(url)
    return f"{gw.url}{parts.path}?{parts.query}"


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes every byte: a truncated object fails here
    assert image.format == "PNG"
    return image


GENERATE: dict[str, Any] = {"model": "hidream-i1-fast", "prompt": "a lighthouse at dusk", "num_inference_steps": 2}


def test_an_image_made_on_one_replica_is_served_by_another_through_the_bucket(
    replicas: Any, bucket: Bucket, tmp_path: Path
) -> None:
    """THE issue's check: replica B serves A's image (signed URL, content endpoint, b64 replay) from S3."""
    a, b = replicas(bucket.env(prefix="images/"))
    key = new_key(a)
    auth = {"Authorization": f"Bearer {key}"}

    sdk = openai.OpenAI(base_url=f"{a.url}/v1", api_key=key, max_retries=0)
    made = sdk.images.generate(
        model=GENERATE["model"],
        prompt=GENERATE["prompt"],
        response_format="url",
        extra_body={"num_inference_steps": 2, "output_format": "png"},
    )
    assert made.data is not None and made.data[0].url is not None
    signed = made.data[0].url
    file_id = urlsplit(signed).path.rsplit("/", 1)[-1]

    from_a = httpx.get(signed)
    assert from_a.status_code == 200, from_a.text
    original = from_a.content
    assert png(original).size == (1024, 1024)
    (stored_key,) = bucket.keys()
    assert stored_key.startswith("images/") and stored_key.endswith(f"/{file_id}.png")
    assert not any((tmp_path / name / "files").exists() for name in ("data-a", "data-b"))  # nothing on local disk

    from_b = httpx.get(on(b, signed))
    assert from_b.status_code == 200, from_b.text
    assert from_b.headers["content-type"] == "image/png"
    assert from_b.headers["cache-control"] == "private, max-age=3600"
    content = httpx.get(f"{b.url}/v1/files/{file_id}/content", headers=auth)
    assert content.status_code == 200, content.text
    digest = hashlib.sha256(original).hexdigest()
    assert hashlib.sha256(from_b.content).hexdigest() == digest
    assert hashlib.sha256(content.content).hexdigest() == digest
    assert httpx.get(f"{b.url}/v1/files/{file_id}", headers=auth).json()["sha256"] == digest

    # b64_json made by A's own request from memory, then replayed on B with the key: B reads it from the bucket.
    body = GENERATE | {"response_format": "b64_json"}
    headers = auth | {"Idempotency-Key": "replicas-b64"}
    first = httpx.post(f"{a.url}/v1/images/generations", json=body, headers=headers, timeout=60)
    assert first.status_code == 200, first.text
    replay = httpx.post(f"{b.url}/v1/images/generations", json=body, headers=headers, timeout=60)
    assert replay.status_code == 200, replay.text
    assert replay.headers.get("Idempotent-Replayed") == "true"
    made_b64 = base64.b64decode(first.json()["data"][0]["b64_json"])
    replayed_b64 = base64.b64decode(replay.json()["data"][0]["b64_json"])
    assert hashlib.sha256(replayed_b64).hexdigest() == hashlib.sha256(made_b64).hexdigest()
    assert png(replayed_b64).size == (1024, 1024)


def test_with_separate_local_directories_another_replica_cannot_serve_the_image(replicas: Any) -> None:
    """Why object storage exists: B has the row (shared database) but not the bytes (A's disk)."""
    a, b = replicas({"HDG_STORAGE": "local"})
    key = new_key(a)
    auth = {"Authorization": f"Bearer {key}"}
    made = httpx.post(f"{a.url}/v1/images/generations", json=GENERATE, headers=auth, timeout=60)
    assert made.status_code == 200, made.text
    (entry,) = made.json()["data"]
    assert httpx.get(entry["url"]).status_code == 200

    for resp in (
        httpx.get(on(b, entry["url"])),
        httpx.get(f"{b.url}/v1/files/{entry['file_id']}/content", headers=auth),
    ):
        assert resp.status_code == 404, resp.text
        assert resp.json()["error"]["message"] == "The file's content is no longer stored."

    body = GENERATE | {"response_format": "b64_json"}
    headers = auth | {"Idempotency-Key": "local-b64"}
    assert httpx.post(f"{a.url}/v1/images/generations", json=body, headers=headers, timeout=60).status_code == 200
    replay = httpx.post(f"{b.url}/v1/images/generations", json=body, headers=headers, timeout=60)
    assert replay.status_code == 404, replay.text
