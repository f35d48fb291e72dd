"""Image storage: the local directory and the S3-compatible bucket behind one interface, and replicas sharing it.

The S3 tests run against moto in server mode (tests/s3.py) over real HTTP. The replica tests start two real gateway
processes on one PostgreSQL database, each with its own data directory, and check that an image made through one
is served by the other: through a bucket it is, through separate local directories it is not.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from PIL import Image

from gateway.settings import Settings
from gateway.storage.files import FileMissing, LocalFileStore, S3FileStore, build_file_store
from tests.fakes.fal import FakeFal
from tests.fakes.server import make_image
from tests.gateway_process import GatewayProcess
from tests.s3 import Bucket, MotoS3

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
                "HDG_URL_SIGNING_SECRET": "replicas-share-this-secret",
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
