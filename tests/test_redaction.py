"""Credentials never reach a tenant or a log: what is redacted (and what is left alone), a provider's input error
bounded before a tenant sees it, attempt lists stored before ``detail`` existed, and a worker's load error.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.backends.base import BackendInputError, Probe
from gateway.backends.remote import INPUT_DETAIL_CHARS, check
from gateway.errors import redact_credentials, tenant_attempts
from gateway.health import HealthBoard
from gateway.storage.db import open_database, session_factory
from gateway.storage.models import Prediction
from tests.conftest import GatewayFactory, fal_only
from tests.fakes.fal import FakeFal
from tests.fakes.server import ServerThread

MODEL = "hidream-ai/hidream-i1-fast"
HDG_KEY = "hdg_" + "Zk3_q-9" * 6
WHSEC = "whsec_MDEyMzQ1Njc4OWFiY2RlZmdoaWo="


@pytest.mark.parametrize(
    ("said", "shown"),
    [
        ("https://alice:s3cret@gpu-1:9000/x failed", "https://***@gpu-1:9000/x failed"),
        ("fetching http://user:p@ss@host/path", "fetching http://***@host/path"),  # an @ in the password too
        ("Bearer\tabc123def456ghi789", "Bearer\t***"),
        ("Bearer  abc123def456ghi789", "Bearer  ***"),
        ("Token: abc123def456ghi789 was refused", "Token: *** was refused"),
        ('{"api_key": "sk-abcdef0123456789abcd"}', '{"api_key": "***"}'),
        ("'token': 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig'", "'token': '***'"),
        ("Authorization: Key 1a2b3c4d-id:0f9e8d7c6b5a4f3e2d1c", "Authorization: Key ***"),
        ("(sent Authorization: Key fal_key_id:fal_key_secret)", "(sent Authorization: Key ***)"),
        ("Basic dXNlcjpwYXNzd29yZDEyMw==", "Basic ***"),
        ("X-Api-Key: abcdefghijklmnopqrstuvwxyzAB", "X-Api-Key: ***"),  # long and opaque, though no digit
        ("password=hunter2hunter2", "password=***"),
        ("client_secret=Zm9vYmFyYmF6cXV4cXV1eA", "client_secret=***"),
        ("GET /v1?api_key=abc123def456ghi789&x=1", "GET /v1?api_key=***&x=1"),
        ("Bearer r8_AbCdEf0123456789 refused; r8_Other123 too", "Bearer *** refused; *** too"),
        ("wk-abcdef123456 / ws-abcdef123456", "*** / ***"),
        ("sent sk-proj0123456789abcdefXYZ", "sent ***"),
        (f"the key {HDG_KEY} is revoked", "the key *** is revoked"),
        (f"signed with {WHSEC}", "signed with ***"),
        ("1a2b3c4d-id:0f9e8d7c6b5a4f3e2d1c", "***"),
    ],
)
def test_credentials_are_redacted(said: str, shown: str) -> None:
    assert redact_credentials(said) == shown


@pytest.mark.parametrize(
    "said",
    [
        "the key parameter is invalid",
        "token expired",
        "Bearer token required",
        "Bearer authentication is required here",
        "authorization failed for this request",
        "password must be at least 12 characters long",
        "invalid api_key format",
        "Key must be a string of 12 characters",
        "the secret is out",
        "ZEBRA-7731 internal stack frame at /srv/provider/secret_module.py",
        "https://gpu-1:9000/a@b",  # an @ in the path is no userinfo
        "urn:hidream-gateway:problem:backend_error",
        "finished at 2024-05-01T10:30:00Z",
        "hdg_backend_attempts_total rose",
        "image_size: Input should be 'square_hd' or 'landscape_4_3'",
    ],
)
def test_plain_words_are_left_alone(said: str) -> None:
    assert redact_credentials(said) == said


def test_redaction_stays_linear_on_hostile_text() -> None:
    # Each of these made an earlier pattern rescan the rest of the text at every position (seconds at this size).
    for text in ("a-" * 50_000, "key:" * 25_000, "https://" + "a" * 100_000):
        assert redact_credentials(text) == text


def _rejected(body: Any) -> str:
    with pytest.raises(BackendInputError) as refused:
        check(httpx.Response(422, json=body), "fal")
    return refused.value.message


def test_a_providers_input_error_reaches_the_tenant_as_one_short_redacted_line() -> None:
    long = "prompt too long.\n  Traceback: worker at https://svc:hunter2@10.0.0.7/run\tsent Bearer abc123def456ghi789 "
    message = _rejected({"detail": long + "x" * 400})
    assert message.startswith("fal rejected the input: prompt too long. Traceback: worker at https://***@10.0.0.7/run")
    assert "sent Bearer ***" in message and "hunter2" not in message and "abc123def456ghi789" not in message
    assert "\n" not in message and "\t" not in message and message.endswith("…")
    assert len(message) == len("fal rejected the input: ") + INPUT_DETAIL_CHARS

    # A validation list names each field; a body without words still says who rejected what.
    fields = [{"loc": ["body", "image_size"], "msg": "Input should be 'square_hd'", "type": "enum"}]
    assert _rejected({"detail": fields}) == "fal rejected the input: image_size: Input should be 'square_hd'"
    assert _rejected({}) == "fal rejected the input (422)."


class _PickyWorker:
    """Our worker protocol: healthy, and rejecting every job's input with a long answer that quotes a credential."""

    DETAIL = (
        "invalid parameters: prompt\n" + "ZEBRA-7731 " * 60 + "(retry with Authorization: Bearer abc123def456ghi789)"
    )

    def __init__(self) -> None:
        self.server = ServerThread(
            Starlette(
                routes=[
                    Route("/generate", self._generate, methods=["POST"]),
                    Route("/health", lambda _: Response(b'{"status": "ok", "ready": true}')),
                ]
            )
        )

    async def _generate(self, request: Request) -> Response:
        await request.body()
        return JSONResponse({"detail": self.DETAIL}, status_code=422)


def test_an_input_error_is_bounded_in_every_place_a_tenant_reads_it(
    make_gateway: GatewayFactory, sqlite_url: str
) -> None:
    worker = _PickyWorker()
    with worker.server:
        gw = make_gateway(sqlite_url, from_settings=True, backends=["worker"], worker_urls=[worker.server.url])
        key = gw.create_tenant()["api_key"]
        auth = {"Authorization": f"Bearer {key}"}
        refused = gw.generate(key)
        assert refused.status_code == 400, refused.text
        message = refused.json()["error"]["message"]
        assert message.startswith("worker rejected the input: invalid parameters: prompt ZEBRA-7731")
        assert len(message) <= len("worker rejected the input: ") + INPUT_DETAIL_CHARS

        created = gw.client.post(
            f"/v1/models/{MODEL}/predictions", json={"input": {"prompt": "x"}}, headers=auth | {"Prefer": "wait=30"}
        )
        assert created.json()["status"] == "failed", created.text
        [attempt] = created.json()["attempts"]
        assert attempt["outcome"] == "invalid_input" and attempt["message"] == created.json()["error"]
        assert refused.json()["error"]["attempts"][0]["message"] == message  # the same words on both APIs
        assert "\n" not in message and "\n" not in attempt["message"]
        assert len(created.json()["error"]) <= len("worker rejected the input: ") + INPUT_DETAIL_CHARS
        for text in (refused.text, created.text):
            assert "abc123def456ghi789" not in text and '"detail"' not in text


def _rewrite_attempt_logs(database_url: str, rewrite: Any) -> None:
    async def run() -> None:
        async with open_database(database_url) as engine, session_factory(engine).begin() as session:
            for p in (await session.execute(select(Prediction))).scalars():
                p.attempt_log = rewrite(p.attempt_log or [])

    asyncio.run(run())


def test_attempts_stored_before_detail_existed_show_the_fixed_phrase(
    make_gateway: GatewayFactory, database_url: str, fal: FakeFal
) -> None:
    gw = make_gateway(database_url, from_settings=True, **fal_only(fal) | {"breaker_failures": 100})
    key = gw.create_tenant()["api_key"]
    auth = {"Authorization": f"Bearer {key}"}
    fal.faults.error_rate = 1.0
    created = gw.client.post(
        f"/v1/models/{MODEL}/predictions", json={"input": {"prompt": "x"}}, headers=auth | {"Prefer": "wait=30"}
    )
    assert created.json()["status"] == "failed", created.text

    # As a version before ``detail`` stored them: the backend's raw words as the message.
    raw = "fal answered 500: ZEBRA-7731 at /srv/secret_module.py (sent Key 1a2b3c4d-id:0f9e8d7c6b5a4f3e2d1c)"
    _rewrite_attempt_logs(
        database_url, lambda log: [{k: v for k, v in a.items() if k != "detail"} | {"message": raw} for a in log]
    )
    prediction = gw.client.get(f"/v1/predictions/{created.json()['id']}", headers=auth)
    [event] = gw.client.get("/v1/usage/events", headers=auth).json()["data"]
    generation = gw.client.get(f"/v1/images/generations/{event['prediction_id']}", headers=auth)
    assert [a["message"] for a in prediction.json()["attempts"]] == ["the backend answered 500"]
    assert [a["message"] for a in generation.json()["attempt_log"]] == ["the backend answered 500"]
    for text in (prediction.text, generation.text):
        assert "ZEBRA-7731" not in text and "1a2b3c4d" not in text


def test_legacy_entries_are_rebuilt_from_outcome_and_status_and_new_ones_kept() -> None:
    legacy = [
        {"backend": "replicate", "outcome": "unauthorized", "status": 401, "message": "Invalid token r8_x"},
        {"backend": "fal", "outcome": "invalid_input", "status": 422, "message": "fal rejected the input: <body>"},
        {"backend": "worker", "outcome": "unreachable", "status": None, "message": "ConnectError to 10.0.0.7"},
        {"backend": "fal", "outcome": "succeeded", "status": None, "message": None},
    ]
    assert [a["message"] for a in tenant_attempts(legacy) or []] == [
        "the backend answered 401: its credentials were refused",
        "the backend rejected the input",
        "the connection failed",
        None,
    ]
    current = {"backend": "fal", "outcome": "invalid_input", "status": 422, "message": "fal rejected: x", "detail": "x"}
    assert tenant_attempts([current]) == [{k: v for k, v in current.items() if k != "detail"}]


def test_a_workers_load_error_is_redacted_in_last_error_and_the_log(caplog: pytest.LogCaptureFixture) -> None:
    board = HealthBoard(clock=lambda: 0.0)
    board.register("worker", max_in_flight=4)
    url = "https://hf:hf_abc123def456ghi789@huggingface.co/x"
    said = f"worker's model failed to load: 401 from {url} (token hf_q1w2e3r4t5y6u7)"
    with caplog.at_level(logging.WARNING, logger="hidream_gateway.health"):
        board.probed("worker", Probe("down", said))
    shown = "worker's model failed to load: 401 from https://***@huggingface.co/x (token ***)"
    assert board.snapshot()["worker"]["last_error"] == shown
    assert shown in caplog.text and "hf_abc123" not in caplog.text and "q1w2e3" not in caplog.text
    assert json.dumps(board.snapshot()).count("***") == 2
