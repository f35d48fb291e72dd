"""The ``hidream-gateway`` command, and the official openai SDK against ``hidream-gateway serve``."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.fakes.server import free_port

CLI = str(Path(sys.executable).parent / "hidream-gateway")


def _env(data_dir: Path, database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HDG_")}
    return env | {"HDG_DATA_DIR": str(data_dir), "HDG_DATABASE_URL": database_url} | extra


def _cli(env: dict[str, str], *args: str) -> Any:
    done = subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if done.stdout.lstrip().startswith(("{", "[")) else done.stdout


@pytest.fixture
def served(tmp_path: Path, database_url: str) -> Iterator[tuple[str, dict[str, str]]]:
    """``hidream-gateway serve`` in a subprocess on the tiny model; yields its URL and environment."""
    env = _env(tmp_path / "data", database_url)
    port = free_port()
    proc = subprocess.Popen(
        [CLI, "serve", "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gateway not ready in time"
            time.sleep(0.2)
        yield url, env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_openai_sdk_generates_a_png_and_usage_lists_it_once(served: tuple[str, dict[str, str]]) -> None:
    url, env = served
    created = _cli(env, "tenants", "create", "sdk-tenant", "--rpm", "100", "--monthly-budget-usd", "5")
    assert set(created) == {"tenant_id", "key_id", "api_key"}

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=created["api_key"], max_retries=0)
    result = client.images.generate(
        model="hidream-i1-fast",
        prompt="a paper boat on a pond",
        response_format="b64_json",
        extra_body={"num_inference_steps": 2},
    )
    assert result.data is not None
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or "")))
    assert image.format == "PNG" and image.size == (1024, 1024)

    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="hdg_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(model="hidream-i1-fast", prompt="x")
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="dall-e-3", prompt="x")

    usage = _cli(env, "usage", "events", "--format", "json")
    [event] = [e for e in usage if e["tenant_id"] == created["tenant_id"]]
    assert event["model"] == "hidream-i1-fast" and event["images"] == 1
    assert event["status"] == "succeeded" and event["price_usd"] == "0.010486"

    listed = _cli(env, "usage", "events", "--tenant", created["tenant_id"], "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(listed)))
    assert [(r["prediction_id"], r["price_usd"]) for r in rows] == [(event["prediction_id"], "0.010486")]


def test_cli_tenants_and_keys(tmp_path: Path, database_url: str) -> None:
    env = _env(tmp_path / "data", database_url)
    assert "latest" in _cli(env, "db", "upgrade")
    tenant = _cli(env, "tenants", "create", "acme")
    second = _cli(env, "keys", "create", tenant["tenant_id"])
    assert second["tenant_id"] == tenant["tenant_id"] and second["api_key"] != tenant["api_key"]
    revoked = _cli(env, "keys", "revoke", second["key_id"])
    assert revoked["id"] == second["key_id"] and revoked["revoked_at"]
    assert "api_key" not in revoked and second["api_key"] not in json.dumps(revoked)
    listed = _cli(env, "tenants", "list", "--json")
    assert [t["name"] for t in listed] == ["acme"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["keys", "create", "ten_missing"], "no tenant"),
        (["keys", "revoke", "key_missing"], "no key"),
        (["tenants", "create", "x", "--rpm", "0"], "positive integer"),
        (["tenants", "create", "x", "--monthly-budget-usd", "lots"], "not a number"),
        (["serve", "--workers", "2"], "local model once per process"),
        (["usage", "events", "--json", "--format", "csv"], "different formats"),
        (["tenants", "create", "x", "--bogus"], "No such option: --bogus"),
        (["tenant", "list"], "No such command 'tenant'"),
    ],
)
def test_cli_errors_are_clear(tmp_path: Path, sqlite_url: str, args: list[str], message: str) -> None:
    done = subprocess.run(
        [CLI, *args], env=_env(tmp_path / "d", sqlite_url), capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()  # one line, that names the command
    assert line.startswith("hidream-gateway") and not done.stdout


def test_invalid_settings_are_reported_without_a_traceback(tmp_path: Path, sqlite_url: str) -> None:
    env = _env(tmp_path / "d", sqlite_url, HDG_BACKENDS="local,nonsense")
    done = subprocess.run([CLI, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "nonsense" in done.stderr and "Traceback" not in done.stderr
