"""A backend whose settings cannot work stops the start with one line naming the setting, unless it is optional."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.errors import ConfigurationError
from gateway.settings import Settings
from tests.conftest import ADMIN_TOKEN, GatewayFactory, fal_only
from tests.fakes.fal import FakeFal
from tests.fakes.replicate import FakeReplicate
from tests.gateway_process import GatewayProcess

MISSING_TOKEN = "replicate is enabled (HDG_BACKENDS) but REPLICATE_API_TOKEN is not set"


@pytest.fixture(autouse=True)
def _no_gateway_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a test leaves out must be missing, whatever the environment running the tests holds: every ``HDG_*``
    setting and the provider variables read without the prefix (a developer's HDG_BACKENDS, FAL_KEY, ...)."""
    for name in [n for n in os.environ if n.startswith("HDG_")] + ["REPLICATE_API_TOKEN", "FAL_KEY"]:
        monkeypatch.delenv(name, raising=False)


def test_the_environment_running_the_tests_is_cleared() -> None:
    assert not [n for n in os.environ if n.startswith("HDG_") or n in ("REPLICATE_API_TOKEN", "FAL_KEY")]
    assert Settings().backends == Settings.model_fields["backends"].get_default(call_default_factory=True)


@pytest.mark.parametrize(
    ("fields", "line"),
    [
        ({"backends": ["replicate"]}, MISSING_TOKEN),
        (
            {"backends": ["replicate"], "replicate_api_token": "r8_abc def"},
            "REPLICATE_API_TOKEN contains spaces or characters an HTTP header cannot carry",
        ),
        (
            {"backends": ["replicate"], "replicate_api_token": "r8_abc", "replicate_base_url": "api.replicate.com"},
            "HDG_REPLICATE_BASE_URL 'api.replicate.com' is not an http(s) URL",
        ),
        ({"backends": ["fal"]}, "fal is enabled (HDG_BACKENDS) but FAL_KEY is not set"),
        ({"backends": ["fal"], "fal_key": "only-the-secret"}, "FAL_KEY is not shaped key_id:key_secret"),
        ({"backends": ["worker"]}, "worker is enabled (HDG_BACKENDS) but HDG_WORKER_URLS is not set"),
        (
            {"backends": ["worker"], "worker_urls": ["http://gpu-1:9000", "gpu-2:9000"]},
            "HDG_WORKER_URLS entry 'gpu-2:9000' is not an http(s) URL",
        ),
        (
            {"backends": ["worker"], "worker_urls": ["https://me--hidream.modal.run"], "modal_key": "wk-1"},
            "HDG_MODAL_KEY and HDG_MODAL_SECRET go together",
        ),
        (
            {"backends": ["worker"], "worker_urls": ["ftp://alice:s3cret@gpu-1:9000/x"]},
            "HDG_WORKER_URLS entry 'ftp://***@gpu-1:9000/x' is not an http(s) URL",
        ),
        ({"backends": ["local"], "local_model": "/no/such/HiDream-I1-Fast"}, "HDG_LOCAL_MODEL '/no/such/HiDream"),
        # Optional elsewhere does not make this one optional.
        ({"backends": ["fal", "replicate"], "optional_backends": ["fal"]}, MISSING_TOKEN),
    ],
)
def test_a_backend_that_cannot_work_stops_create_app_before_anything_starts(
    tmp_path: Path, fields: dict[str, Any], line: str
) -> None:
    settings = Settings(data_dir=tmp_path / "data", **fields)
    with pytest.raises(ConfigurationError) as raised:
        create_app(settings)
    message = str(raised.value)
    assert line in message and "\n" not in message
    assert "s3cret" not in message  # a URL's password is never echoed
    kind = fields["backends"][-1]
    assert message.endswith(f"fix it, or add {kind} to HDG_OPTIONAL_BACKENDS to start without it")
    assert not (tmp_path / "data").exists()  # refused before the database or anything else was touched


def test_an_optional_misconfigured_backend_is_shown_and_never_routed_to(
    make_gateway: GatewayFactory, sqlite_url: str, fal: FakeFal
) -> None:
    with FakeReplicate() as replicate:
        # Replicate's URL is its fake's, and its token is missing: were it ever routed to, the fake would count it.
        both = fal_only(fal) | {"backends": ["replicate", "fal"], "replicate_base_url": replicate.url}
        gw = make_gateway(sqlite_url, from_settings=True, optional_backends=["replicate"], **both)
        ready = gw.client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"]["backends"] == {"replicate": "misconfigured", "fal": "up"}
        shown = {b["name"]: b for b in gw.admin("GET", "/admin/backends").json()["data"]}
        assert shown["replicate"]["state"] == "misconfigured" and shown["replicate"]["ready"] is False
        assert MISSING_TOKEN in shown["replicate"]["last_error"]

        key = gw.create_tenant()["api_key"]
        served = gw.generate(key)  # replicate is the cheaper of the two, were it configured
        assert (served.headers["X-HDG-Backend"], served.headers["X-HDG-Attempts"]) == ("fal", "1")
        pinned = gw.client.post(
            "/v1/images/generations",
            json={"prompt": "a red fox", "model": "hidream-i1-fast"},
            headers={"Authorization": f"Bearer {key}", "X-HDG-Route": "replicate"},
        )
        assert pinned.status_code == 503 and "replicate is misconfigured" in pinned.json()["error"]["message"]
        assert "REPLICATE_API_TOKEN" not in pinned.text  # the setting is the operator's business
        assert int(pinned.headers["Retry-After"]) >= 1
        assert replicate.creates == 0


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HDG_DATA_DIR": str(tmp_path / "data"), "HDG_ADMIN_TOKEN": ADMIN_TOKEN, **extra}


def test_serve_prints_one_line_naming_the_setting_and_exits_non_zero(tmp_path: Path) -> None:
    env = GatewayProcess(_env(tmp_path, HDG_BACKENDS="local,replicate"), log_path=tmp_path / "unused.log").env
    cli = str(Path(sys.executable).parent / "hidream-gateway")
    result = subprocess.run(
        [cli, "serve", "--port", "1"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"hidream-gateway: {MISSING_TOKEN}; fix it, or add replicate to HDG_OPTIONAL_BACKENDS to start without it"
    ]
    assert not (tmp_path / "data").exists()  # before migrations, before building the tiny model


def test_an_asgi_server_process_refuses_to_start_too(tmp_path: Path) -> None:
    process = GatewayProcess(_env(tmp_path, HDG_BACKENDS="fal", FAL_KEY="no-colon"), log_path=tmp_path / "gw.log")
    with pytest.raises(RuntimeError, match="the gateway exited"):
        process.start()
    assert "FAL_KEY is not shaped key_id:key_secret" in process.log_tail()


def test_an_optional_misconfigured_backend_lets_the_process_serve(tmp_path: Path, fal: FakeFal) -> None:
    env = _env(
        tmp_path,
        HDG_BACKENDS="fal,replicate",
        HDG_OPTIONAL_BACKENDS="replicate",
        FAL_KEY=fal.key,
        HDG_FAL_BASE_URL=fal.url,
    )
    with GatewayProcess(env, log_path=tmp_path / "gw.log") as gw:
        ready = httpx.get(f"{gw.url}/readyz", timeout=10)
        assert ready.status_code == 200
        assert ready.json()["checks"]["backends"] == {"fal": "up", "replicate": "misconfigured"}
    assert "replicate is misconfigured and will not be used" in gw.log_tail()


def test_a_served_app_freezes_what_start_up_made_and_a_test_app_does_not(tmp_path: Path) -> None:
    # The one app a process serves (app_from_env, `serve`) takes its start-up objects out of the cycle collector's
    # walks; apps made by the dozen in one process (tests) do not, so their cycles are still collected.
    import gc

    from tests.fakes.server import ServerThread

    gc.unfreeze()
    try:
        for freeze, expect in ((False, False), (True, True)):
            app = create_app(Settings(data_dir=tmp_path / f"data-{freeze}"), backends=[], freeze_gc=freeze)
            server = ServerThread(app).start()
            try:
                assert httpx.get(f"http://127.0.0.1:{server.port}/healthz").status_code == 200
                assert (gc.get_freeze_count() > 0) is expect
            finally:
                server.stop()
    finally:
        gc.unfreeze()
