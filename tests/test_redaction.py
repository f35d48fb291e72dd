"""Credentials never reach a tenant or a log: what is redacted (and what is left alone), a provider's input error
bounded before a tenant sees it, attempt lists stored before ``detail`` existed, and a worker's load error.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.auth import hash_key
from gateway.backends.base import BackendInputError, ImageJob, Probe
from gateway.backends.remote import INPUT_DETAIL_CHARS, check
from gateway.errors import redact_credentials, tenant_attempts
from gateway.health import HealthBoard
from gateway.storage.db import open_database, session_factory, upgrade
from gateway.storage.models import ApiKey, Prediction, Tenant
from tests.conftest import GatewayFactory, fal_only
from tests.fakes.fal import FakeFal
from tests.fakes.worker import healthy_worker

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
        # After a bare key: secrets with slashes, dots or underscores are still secrets.
        ("key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "key: ***"),
        (
            "key: eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
            "key: ***",
        ),
        ("key: AIzaSyA1b2C3d4E5f6G7h8I9j0Kl.MnOp", "key: ***"),
        ("key: sk_live_4eC39HqLyjWDarjtT1zdp7dc", "key: ***"),
        ("sessionid:abc123def456ghi789", "***"),
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
        # Identifiers an admin needs to read: a request id, a digest, a Replicate version, a weight's key or file.
        "upstream failed (request_id:3fa85f64-5717-4562-b3fc-2c963f66afa6)",
        "traceId:3fa85f645717ab4562b3fc2c963f66afa6",
        f"layer blob sha256:{'9c4e2b7a' * 8} is missing",
        f"version hidream-ai/hidream-i1-full:{'6f5a0c1d' * 8} not found",
        "key: /models/hidream/transformer/diffusion_pytorch_model-00001.safetensors",
        "Unexpected key: model.layers.0.mlp.experts.gate_proj.weight in state_dict",
        "Invalid key image_size_1024x1024",
        "key: config.json",
        "key: ./weights/transformer.safetensors",
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


@pytest.mark.parametrize(
    ("resp", "said"),
    [
        # An intermediary's page (a proxy, a load balancer, a WAF) is not the provider's word: never shown.
        (
            httpx.Response(400, text="<html><body><h1>400 Bad Request</h1>nginx/1.25 at 10.0.0.7</body></html>"),
            "fal rejected the input (400).",
        ),
        (httpx.Response(422, text="upstream connect error: internal-lb.svc:8080"), "fal rejected the input (422)."),
        (httpx.Response(422, json="a bare JSON string"), "fal rejected the input (422)."),
        (httpx.Response(422, json={"trace": "/srv/app.py line 7", "code": 17}), "fal rejected the input (422)."),
        (httpx.Response(422, json={"detail": {"internal": "ZEBRA-7731"}}), "fal rejected the input (422)."),
        (httpx.Response(422, json={"detail": [{"internal": "ZEBRA-7731"}]}), "fal rejected the input (422)."),
        # The provider's own words, from any of the fields providers put them in.
        (httpx.Response(422, json={"message": "prompt is empty"}), "fal rejected the input: prompt is empty"),
        (httpx.Response(400, json={"title": "Invalid steps"}), "fal rejected the input: Invalid steps"),
        (
            httpx.Response(400, json={"error": {"message": "size must be 1024x1024", "type": "invalid_request"}}),
            "fal rejected the input: size must be 1024x1024",
        ),
        (
            httpx.Response(422, json=[{"loc": ["body", "seed"], "msg": "must be >= 0"}]),
            "fal rejected the input: seed: must be >= 0",
        ),
    ],
)
def test_only_a_json_answers_own_words_reach_the_tenant(resp: httpx.Response, said: str) -> None:
    with pytest.raises(BackendInputError) as refused:
        check(resp, "fal")
    assert refused.value.message == said


class _PickyWorker:
    """Our worker protocol: healthy, and rejecting every job's input with a long answer that quotes a credential."""

    DETAIL = (
        "invalid parameters: prompt\n" + "ZEBRA-7731 " * 60 + "(retry with Authorization: Bearer abc123def456ghi789)"
    )

    def __init__(self) -> None:
        self.server = healthy_worker(self._generate)

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


RAW_500 = (
    "fal answered 500: <html>ZEBRA-7731\nat /srv/secret_module.py</html> (sent Key 1a2b3c4d-id:0f9e8d7c6b5a4f3e2d1c)"
)
RAW_401 = "replicate rejected the token r8_AbCdEf0123456789 (ZEBRA-7731)."
GEN_TWO = "gen_000000000000000000000001"
GEN_PRE = "gen_000000000000000000000002"
GEN_WON = "gen_000000000000000000000003"
GEN_NEW = "gen_000000000000000000000004"
GEN_ODD = "gen_000000000000000000000005"
RAW_DOWN = "worker cannot be reached: ConnectError to ZEBRA-7731.internal:9000"


def _legacy_row(p_id: str, tenant_id: str, key_id: str, **fields: Any) -> Prediction:
    now = datetime.now(UTC)
    job = ImageJob(variant="fast", prompt="a fox", width=64, height=64, seed=1)
    base: dict[str, Any] = dict(
        id=p_id, tenant_id=tenant_id, api_key_id=key_id, model="hidream-i1-fast", prompt="a fox", params={},
        width=64, height=64, n=1, seed=1, attempts=1, created_at=now, completed_at=now, api="replicate",
        job=asdict(job), route="cheapest", available_at=now, cancel_requested=False, status="failed",
    )  # fmt: skip
    return Prediction(**(base | fields))


def test_migration_0007_takes_the_backends_words_out_of_old_rows(
    make_gateway: GatewayFactory, database_url: str
) -> None:
    """Rows as versions before fixed phrases wrote them: tenants' views quote nothing; admins keep each detail."""
    plaintext = "hdg_" + "Legacy-Key-0123456789" * 2
    current = {"backend": "fal", "outcome": "failed", "status": 500, "message": "the backend answered 500"}
    current |= {"detail": "fal answered 500: kept as is"}

    async def legacy_rows() -> None:
        async with open_database(database_url, migrate=False) as engine:
            await upgrade(engine, "0006")
            async with session_factory(engine).begin() as session:
                session.add(Tenant(id="ten_old", name="old", status="active"))
                await session.flush()
                session.add(ApiKey(id="key_old", tenant_id="ten_old", key_hash=hash_key(plaintext), display_prefix="x"))
                await session.flush()
                session.add_all(
                    [
                        # Between 0005 and fixed phrases: the words in each attempt's message, the error, the logs.
                        _legacy_row(
                            GEN_TWO,
                            "ten_old",
                            "key_old",
                            attempts=2,
                            error_code="backend_error",
                            error=f"{RAW_500}. None of the 2 attempts succeeded; each is listed in attempts.",
                            logs=f"Attempt 1 on fal.\nfal failed: {RAW_500}\nAttempt 2 on replicate.\n"
                            f"replicate failed: {RAW_401}\n",
                            attempt_log=[
                                {"backend": "fal", "outcome": "failed", "status": 500, "message": RAW_500[:500]},
                                {"backend": "replicate", "outcome": "unauthorized", "status": 401, "message": RAW_401},
                            ],
                        ),
                        # Before 0005: no attempt list, the words in the error and the logs.
                        _legacy_row(
                            GEN_PRE,
                            "ten_old",
                            "key_old",
                            error_code="timeout",
                            error=f"No backend finished in time. The first failure: {RAW_DOWN}",
                            logs=f"Attempt 1 on worker.\nworker failed: {RAW_DOWN}\n",
                        ),
                        # A success after a failover: its attempts and logs quoted the failure too.
                        _legacy_row(
                            GEN_WON,
                            "ten_old",
                            "key_old",
                            status="succeeded",
                            attempts=2,
                            logs=f"Attempt 1 on worker.\nworker failed: {RAW_DOWN}\nAttempt 2 on fal.\nSucceeded on fal.\n",  # noqa: E501
                            attempt_log=[
                                {"backend": "worker", "outcome": "unreachable", "status": None, "message": RAW_DOWN},
                                {"backend": "fal", "outcome": "succeeded", "status": None, "message": None},
                            ],
                        ),
                        # A log that is not a list (nothing the gateway wrote): read as no attempts.
                        _legacy_row(
                            GEN_ODD,
                            "ten_old",
                            "key_old",
                            error_code="backend_error",
                            error=f"fal answered 500: {RAW_500}",
                            attempt_log={"backend": "fal"},
                        ),
                        _legacy_row(
                            GEN_NEW,
                            "ten_old",
                            "key_old",
                            error_code="backend_error",
                            error="fal: the backend answered 500.",
                            logs="Attempt 1 on fal.\nfal failed: the backend answered 500.\n",
                            attempt_log=[current],
                        ),
                    ]
                )

    asyncio.run(legacy_rows())
    gw = make_gateway(database_url)  # migrates to the head
    auth = {"Authorization": f"Bearer {plaintext}"}
    seen = {}
    for p_id in (GEN_TWO, GEN_PRE, GEN_WON, GEN_ODD, GEN_NEW):
        replicate_view = gw.client.get(f"/v1/predictions/{p_id}", headers=auth)
        openai_view = gw.client.get(f"/v1/images/generations/{p_id}", headers=auth)
        assert replicate_view.status_code == openai_view.status_code == 200, replicate_view.text
        for text in (replicate_view.text, openai_view.text):
            assert "ZEBRA" not in text and "r8_" not in text and "1a2b3c4d" not in text and "secret_module" not in text
        seen[p_id] = replicate_view.json()

    two = seen[GEN_TWO]
    assert two["error"] == (
        "fal: the backend answered 500. None of the 2 attempts succeeded; each is listed in attempts."
    )
    assert [a["message"] for a in two["attempts"]] == [
        "the backend answered 500",
        "the backend answered 401: its credentials were refused",
    ]
    assert two["logs"] == (
        "Attempt 1 on fal.\nfal failed: the backend answered 500.\nAttempt 2 on replicate.\n"
        "replicate failed: the backend answered 401: its credentials were refused.\n"
    )
    assert seen[GEN_PRE]["error"] == "No backend finished in time."
    assert seen[GEN_PRE]["attempts"] is None
    assert seen[GEN_PRE]["logs"] == "Attempt 1 on worker.\nworker failed: the backend failed.\n"
    won = seen[GEN_WON]
    assert won["status"] == "succeeded" and won["error"] is None
    assert [a["message"] for a in won["attempts"]] == ["the connection failed", None]
    assert (
        won["logs"]
        == "Attempt 1 on worker.\nworker failed: the connection failed.\nAttempt 2 on fal.\nSucceeded on fal.\n"
    )
    assert seen[GEN_NEW]["error"] == "fal: the backend answered 500."
    assert seen[GEN_ODD]["error"] == "A backend failed; the prediction failed."

    # Admins keep the backends' words, credentials redacted; a row already in the new shape is untouched.
    logs = _attempt_logs(database_url)
    assert [a["detail"] for a in logs[GEN_TWO]] == [
        redact_credentials(RAW_500),
        "replicate rejected the token *** (ZEBRA-7731).",
    ]
    assert "(sent Key ***)" in logs[GEN_TWO][0]["detail"]
    assert [a["detail"] for a in logs[GEN_WON]] == [RAW_DOWN, None]
    assert logs[GEN_NEW] == [current]
    assert logs[GEN_ODD] == {"backend": "fal"}  # type: ignore[comparison-overlap]
    assert GEN_PRE not in logs


def _attempt_logs(database_url: str) -> dict[str, list[dict[str, Any]]]:
    async def read() -> dict[str, list[dict[str, Any]]]:
        async with open_database(database_url) as engine, session_factory(engine)() as session:
            rows = (await session.execute(select(Prediction).where(Prediction.attempt_log.is_not(None)))).scalars()
            return {p.id: p.attempt_log or [] for p in rows}

    return asyncio.run(read())
