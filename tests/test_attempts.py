"""Every attempt reported, and one rule for the status code, the same through the OpenAI and Replicate APIs.

The rule (README, "When generation fails"): the job's time ran out, 504; any attempt failed on an upstream error,
502 ``backend_error``; attempts that ran past their time, 504; every backend at capacity or not ready, 503 with
Retry-After. Providers are the fake Replicate and fal servers told to fail, over real HTTP.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import replicate as replicate_sdk
from replicate.exceptions import ModelError

from gateway.errors import (
    BackendBusy,
    BackendFailed,
    BackendUnauthorized,
    BackendUnavailable,
    BackendUnreachable,
    GatewayError,
    GenerationTimeout,
    problem_response,
)
from gateway.jobs import Attempt, final_error
from inference.runner import HiDreamRunner
from inference.serving import GenerationQueue
from inference.variants import VARIANTS
from inference.worker import create_worker_app
from tests.conftest import WORKER_TOKEN, GatewayFactory, fal_only
from tests.fakes.fal import FakeFal
from tests.fakes.replicate import FakeReplicate
from tests.fakes.server import ServerThread
from tests.fakes.tcp_proxy import TcpProxy

MODEL = "hidream-ai/hidream-i1-fast"


@pytest.fixture
def replicate() -> Iterator[FakeReplicate]:
    with FakeReplicate() as fake:
        yield fake


def _providers(replicate: FakeReplicate, fal: FakeFal, **overrides: Any) -> dict[str, Any]:
    """Settings for a gateway in front of both fakes; Replicate's token is the wrong one unless overridden."""
    return {
        **fal_only(fal),
        "backends": ["replicate", "fal"],
        "replicate_api_token": "r8_not_the_right_token",
        "replicate_base_url": replicate.url,
        "replicate_output_hosts": [replicate.url],
    } | overrides


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_openai_api_names_replicates_401_first_and_lists_both_attempts(
    make_gateway: GatewayFactory, database_url: str, replicate: FakeReplicate, fal: FakeFal
) -> None:
    gw = make_gateway(database_url, from_settings=True, **_providers(replicate, fal))
    key = gw.create_tenant()["api_key"]
    fal.stop()  # refuses connections

    resp = gw.client.post(
        "/v1/images/generations",
        json={"prompt": "a red fox"},
        headers=_auth(key) | {"X-HDG-Route": "replicate,fal"},
    )

    assert resp.status_code == 502, resp.text
    error = resp.json()["error"]
    assert error["code"] == "backend_error" and error["type"] == "server_error"
    assert error["message"].startswith("replicate: the backend answered 401: its credentials were refused.")
    assert error["attempts"] == [  # each in fixed words: the backends' own are for admins (attempt_log's detail)
        {
            "backend": "replicate",
            "outcome": "unauthorized",
            "status": 401,
            "message": "the backend answered 401: its credentials were refused",
        },
        {"backend": "fal", "outcome": "unreachable", "status": None, "message": "the connection failed"},
    ]
    # The list outlives the request: it is on the generation's row.
    [event] = gw.client.get("/v1/usage/events", headers=_auth(key)).json()["data"]
    stored = gw.client.get(f"/v1/images/generations/{event['prediction_id']}", headers=_auth(key)).json()
    assert stored["status"] == "failed" and stored["attempts"] == 2
    assert stored["attempt_log"] == error["attempts"]

    # The official SDK hands the same body to the caller.
    sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as raised:
        sdk.images.generate(prompt="a red fox", extra_headers={"X-HDG-Route": "replicate,fal"})
    assert raised.value.status_code == 502
    body: Any = raised.value.body
    assert [(a["backend"], a["outcome"]) for a in body["attempts"]] == [
        ("replicate", "unauthorized"),
        ("fal", "unreachable"),
    ]


def test_replicate_api_keeps_error_a_string_and_lists_attempts_on_every_replica(
    make_gateway: GatewayFactory, database_url: str, replicate: FakeReplicate, fal: FakeFal
) -> None:
    gw = make_gateway(database_url, from_settings=True, **_providers(replicate, fal))
    key = gw.create_tenant(route="replicate,fal")["api_key"]
    fal.stop()

    client = replicate_sdk.Client(api_token=key, base_url=gw.url)
    with pytest.raises(ModelError) as raised:
        client.run(MODEL, input={"prompt": "a lighthouse at dusk"})
    prediction = raised.value.prediction
    assert prediction.status == "failed"
    assert isinstance(prediction.error, str) and prediction.error.startswith("replicate: the backend answered 401")

    # Polled later, through another replica on the same database: the list is read from the row.
    other = make_gateway(database_url)
    polled = other.client.get(f"/v1/predictions/{prediction.id}", headers=_auth(key)).json()
    assert polled["error"] == prediction.error
    assert [(a["backend"], a["outcome"], a["status"]) for a in polled["attempts"]] == [
        ("replicate", "unauthorized", 401),
        ("fal", "unreachable", None),
    ]
    assert "fal failed: the connection failed." in polled["logs"]


def test_attempts_of_a_prediction_that_succeeded_on_the_second_backend(
    make_gateway: GatewayFactory, sqlite_url: str, replicate: FakeReplicate, fal: FakeFal
) -> None:
    gw = make_gateway(sqlite_url, from_settings=True, **_providers(replicate, fal))
    key = gw.create_tenant(route="replicate,fal")["api_key"]
    created = gw.client.post(
        f"/v1/models/{MODEL}/predictions",
        json={"input": {"prompt": "x"}},
        headers=_auth(key) | {"Prefer": "wait"},
    ).json()
    assert created["status"] == "succeeded" and created["error"] is None
    assert [(a["backend"], a["outcome"]) for a in created["attempts"]] == [
        ("replicate", "unauthorized"),
        ("fal", "succeeded"),
    ]
    fal.faults.latency_s = 1.0  # so the next one is still running when its create is answered
    queued = gw.client.post(f"/v1/models/{MODEL}/predictions", json={"input": {"prompt": "x"}}, headers=_auth(key))
    assert queued.json()["attempts"] is None  # not ended yet: nothing to report


@pytest.mark.parametrize(
    ("fault", "status", "code", "outcome", "upstream"),
    [
        ({"error_rate": 1.0}, 502, "backend_error", "failed", 500),
        ({"malformed": True}, 502, "backend_error", "failed", 200),
        ({"fail_jobs": True}, 502, "backend_error", "failed", None),
        ({"throttle": True, "retry_after_s": 3}, 503, "backend_busy", "busy", 429),
        ({"hang": True}, 504, "timeout", "timeout", None),
    ],
)
def test_each_fault_gets_the_status_the_rule_gives_in_both_apis(
    make_gateway: GatewayFactory,
    sqlite_url: str,
    fal: FakeFal,
    fault: dict[str, Any],
    status: int,
    code: str,
    outcome: str,
    upstream: int | None,
) -> None:
    gw = make_gateway(sqlite_url, from_settings=True, attempt_timeout_seconds=1.0, **fal_only(fal))
    key = gw.create_tenant()["api_key"]
    for name, value in fault.items():
        setattr(fal.faults, name, value)

    resp = gw.generate(key)

    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] == code
    [attempt] = error["attempts"]
    assert (attempt["backend"], attempt["outcome"], attempt["status"]) == ("fal", outcome, upstream)
    assert error["message"] == f"fal: {attempt['message']}."  # one attempt: named in the same words
    if status == 503:
        assert resp.headers["Retry-After"] == "3"
    else:
        assert "Retry-After" not in resp.headers

    # The Replicate API records the same attempt on the prediction (its status is 201 and "failed"). A throttled
    # backend first makes the job wait its turn (the 3 s of Retry-After), then it is tried and refused again.
    created = gw.client.post(
        f"/v1/models/{MODEL}/predictions",
        json={"input": {"prompt": "x"}},
        headers=_auth(key) | {"Prefer": "wait=10"},
    )
    failed = created.json()
    fal.faults.hang = False
    assert failed["status"] == "failed" and failed["error"] == error["message"]
    assert [(a["outcome"], a["status"]) for a in failed["attempts"]] == [(outcome, upstream)]


def test_a_wrong_fal_key_is_502_unauthorized_not_503(
    make_gateway: GatewayFactory, sqlite_url: str, fal: FakeFal
) -> None:
    gw = make_gateway(sqlite_url, from_settings=True, **(fal_only(fal) | {"fal_key": "wrong_id:wrong_secret"}))
    key = gw.create_tenant()["api_key"]

    resp = gw.generate(key)

    assert resp.status_code == 502 and resp.json()["error"]["code"] == "backend_error"
    [attempt] = resp.json()["error"]["attempts"]
    assert (attempt["outcome"], attempt["status"]) == ("unauthorized", 401)


def test_a_connection_dropped_mid_generation_is_502(
    make_gateway: GatewayFactory, sqlite_url: str, runner: HiDreamRunner
) -> None:
    queue = GenerationQueue(lambda: runner, queue_size=4)
    worker = ServerThread(create_worker_app(queue, token=WORKER_TOKEN, variants=frozenset(VARIANTS))).start()
    proxy = TcpProxy("127.0.0.1", worker.port).start()
    try:
        gw = make_gateway(
            sqlite_url,
            from_settings=True,
            backends=["worker"],
            worker_urls=[f"http://127.0.0.1:{proxy.port}"],
            worker_token=WORKER_TOKEN,
        )
        key = gw.create_tenant()["api_key"]
        with httpx.Client(base_url=gw.url, timeout=60) as client:
            pending = client.build_request(
                "POST",
                "/v1/images/generations",
                json={"prompt": "x", "num_inference_steps": 100},
                headers=_auth(key),
            )
            response: dict[str, httpx.Response] = {}
            sender = threading.Thread(target=lambda: response.update(resp=client.send(pending)))
            sender.start()
            deadline = time.monotonic() + 30
            while queue.pending == 0:  # the worker is generating: cut its connection now
                assert time.monotonic() < deadline
                time.sleep(0.01)
            proxy.cut()
            sender.join(timeout=60)
        resp = response["resp"]
        assert resp.status_code == 502, resp.text
        [attempt] = resp.json()["error"]["attempts"]
        assert (attempt["backend"], attempt["outcome"]) == ("worker", "unreachable")
        assert attempt["message"] == "the connection failed" and "detail" not in attempt
    finally:
        proxy.stop()
        worker.stop()


def _tried(backend: str, error: GatewayError | None) -> Attempt:
    attempt = Attempt(backend)
    attempt.end("succeeded" if error is None else error.outcome, error)
    return attempt


def test_the_rule_in_order_of_precedence() -> None:
    unauthorized = BackendUnauthorized("replicate rejected the gateway's credentials (401).", upstream_status=401)
    busy = BackendBusy("fal is throttling or busy.", retry_after=9, upstream_status=429)
    slow = GenerationTimeout("worker did not finish within 60 s.")
    unready = BackendUnavailable("The local model is not available: loading.")

    # Any upstream error wins, wherever it came in the order, and is named first.
    mixed = final_error(
        [_tried("fal", busy), _tried("replicate", unauthorized), _tried("worker", slow)], out_of_time=False
    )
    assert isinstance(mixed, BackendFailed) and mixed.status_code == 502
    assert mixed.message.startswith("replicate: the backend answered 401: its credentials were refused.")
    assert "None of the 3 attempts succeeded" in mixed.message
    assert [a["outcome"] for a in mixed.attempts or []] == ["busy", "unauthorized", "timeout"]
    # Then attempts past their time; then "nobody could take it", with the soonest Retry-After.
    assert final_error([_tried("fal", busy), _tried("worker", slow)], out_of_time=False).status_code == 504
    refused = final_error([_tried("local", unready), _tried("fal", busy)], out_of_time=False)
    assert (refused.status_code, refused.code, refused.headers["Retry-After"]) == (503, "backend_busy", "9")
    alone = final_error([_tried("local", unready)], out_of_time=False)
    assert (alone.code, alone.message, "Retry-After" in alone.headers) == (
        "backend_unavailable",
        "local: the backend is not ready.",
        True,
    )
    # The job's own deadline overrides everything: 504, naming the first failure.
    late = final_error([_tried("replicate", unauthorized)], out_of_time=True)
    assert late.status_code == 504
    assert late.message.endswith(
        "The first failure: replicate: the backend answered 401: its credentials were refused."
    )
    unreachable = BackendUnreachable("fal cannot be reached (ConnectError).")
    assert final_error([_tried("fal", unreachable)], out_of_time=False).status_code == 502


def test_problem_json_carries_the_attempts_too() -> None:
    entry = {"backend": "fal", "outcome": "failed", "status": 500, "message": "the backend answered 500"}
    error = BackendFailed("fal: the backend answered 500.", attempts=[entry | {"detail": "fal answered 500: boom"}])
    body = json.loads(problem_response(error).body)
    assert body["status"] == 502 and body["attempts"] == [entry]  # the admins' detail never goes out
    assert error.body()["error"]["attempts"] == [entry]
    assert "attempts" not in json.loads(problem_response(BackendFailed("x")).body)
