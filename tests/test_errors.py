"""Bad input gets a clear OpenAI-style error naming the field, and never a 500."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import FAST, Gateway


def _post(gw: Gateway, key: str, content: bytes | str, content_type: str = "application/json") -> httpx.Response:
    return gw.client.post(
        "/v1/images/generations",
        content=content,
        headers={"Authorization": f"Bearer {key}", "Content-Type": content_type},
    )


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": "dall-e-3", "prompt": "x"}, 404, "model", "model_not_found"),
        ({"prompt": "x", "n": 0}, 400, "n", "invalid_value"),
        ({"prompt": "x", "n": 5}, 400, "n", "invalid_value"),
        ({"prompt": "x", "n": "two"}, 400, "n", "invalid_value"),
        ({"prompt": "x", "size": "big"}, 400, "size", "invalid_value"),
        ({"prompt": "x", "size": "10x10"}, 400, "size", "invalid_value"),
        ({"prompt": "x", "size": "1024x99999"}, 400, "size", "invalid_value"),
        ({"prompt": "x", "response_format": "gif"}, 400, "response_format", "invalid_value"),
        ({"prompt": "x", "output_format": "bmp"}, 400, "output_format", "invalid_value"),
        ({"prompt": "x", "seed": -1}, 400, "seed", "invalid_value"),
        ({"prompt": "x", "seed": 2**40}, 400, "seed", "invalid_value"),
        ({"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps", "invalid_value"),
        ({"prompt": "x", "guidance_scale": 99}, 400, "guidance_scale", "invalid_value"),
        ({"prompt": "x", "stream": True}, 400, "stream", "invalid_value"),
        ({}, 400, "prompt", "invalid_value"),
        ({"prompt": ""}, 400, "prompt", "invalid_value"),
        ({"prompt": "   "}, 400, "prompt", "invalid_value"),
        ({"prompt": 42}, 400, "prompt", "invalid_value"),
        ({"prompt": "x" * 2001}, 400, "prompt", "string_above_max_length"),
        ({"prompt": "x", "negative_prompt": "y" * 2001}, 400, "negative_prompt", "string_above_max_length"),
    ],
)
def test_invalid_fields_are_named(
    sqlite_gateway: Gateway, body: dict[str, Any], status: int, param: str, code: str
) -> None:
    key = sqlite_gateway.create_tenant()["api_key"]
    resp = _post(sqlite_gateway, key, json.dumps(body))
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["code"] == code
    assert error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('"a string"', "JSON object"),
        ("", "Invalid request"),
    ],
)
def test_malformed_bodies_are_400(sqlite_gateway: Gateway, content: str, message: str) -> None:
    key = sqlite_gateway.create_tenant()["api_key"]
    resp = _post(sqlite_gateway, key, content)
    assert resp.status_code == 400, resp.text
    assert message in resp.json()["error"]["message"]


def test_body_over_64_kib_is_413_even_when_chunked(sqlite_gateway: Gateway) -> None:
    key = sqlite_gateway.create_tenant()["api_key"]
    big = json.dumps({"prompt": "x" * (64 * 1024)})
    resp = _post(sqlite_gateway, key, big)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"

    def chunks() -> Any:  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096].encode()

    resp = sqlite_gateway.client.post(
        "/v1/images/generations",
        content=chunks(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    assert resp.status_code == 413


def test_prompt_limit_is_configurable(make_gateway: Any, sqlite_url: str) -> None:
    gw = make_gateway(sqlite_url, max_prompt_chars=10)
    key = gw.create_tenant()["api_key"]
    assert gw.generate(key, prompt="x" * 11).status_code == 400
    assert gw.generate(key, prompt="x" * 10).status_code == 200


def test_unknown_paths_and_methods_use_the_error_format(sqlite_gateway: Gateway) -> None:
    resp = sqlite_gateway.client.get("/v1/nothing-here")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    resp = sqlite_gateway.client.get("/v1/images/generations")
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"


_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
_fields = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.one_of(st.text(min_size=1, max_size=40), _junk),
        "model": st.one_of(st.sampled_from(["hidream-i1-fast", "hidream-i1-dev", "nope"]), _junk),
        "n": st.one_of(st.integers(min_value=-2, max_value=6), _junk),
        "size": st.one_of(st.sampled_from(["1024x1024", "640x480", "0x0", "x", "auto"]), _junk),
        "response_format": st.one_of(st.sampled_from(["url", "b64_json"]), _junk),
        "output_format": st.one_of(st.sampled_from(["png", "jpeg", "webp"]), _junk),
        "seed": _junk,
        "guidance_scale": _junk,
        "negative_prompt": _junk,
        "user": _junk,
        "output_compression": _junk,
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_fields)
def test_no_client_input_causes_a_500(sqlite_gateway: Gateway, body: dict[str, Any]) -> None:
    key = sqlite_gateway.__dict__.setdefault("_fuzz_key", sqlite_gateway.create_tenant()["api_key"])
    body = {**body, "num_inference_steps": 1}  # keep the valid cases cheap
    resp = _post(sqlite_gateway, key, json.dumps(body))
    assert resp.status_code < 500, resp.text
    if resp.status_code != 200:
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_the_images_route_answers_the_same_past_the_router(make_gateway: Any, tmp_path: Any) -> None:
    # DirectRoutes hands POST /v1/images/generations to its endpoint without FastAPI's router and exception layer.
    # The same requests, to a gateway without it, get the same answers: errors by the same handlers, the route's
    # metrics label, the request id, the body limit in front of it, and an unknown method still refused.
    direct = make_gateway(f"sqlite+aiosqlite:///{tmp_path / 'direct.db'}")
    routed = make_gateway(f"sqlite+aiosqlite:///{tmp_path / 'routed.db'}", direct=False)
    cases: list[tuple[str, bytes, dict[str, str]]] = [
        ("POST", json.dumps({"prompt": "x", "n": 9}).encode(), {}),
        ("POST", json.dumps({"model": "dall-e-3", "prompt": "x"}).encode(), {}),
        ("POST", b"{not json", {}),
        ("POST", b"prompt=x", {"Content-Type": "application/x-www-form-urlencoded"}),
        ("POST", json.dumps({"prompt": "x" * 70_000}).encode(), {}),  # over HDG_MAX_BODY_BYTES
        ("POST", json.dumps({"prompt": "x"}).encode(), {"Authorization": "Bearer sk-hdg-nope"}),
        ("POST", json.dumps({"prompt": "x"}).encode(), {"Authorization": ""}),
        ("POST", json.dumps({"prompt": "x", "num_inference_steps": 1}).encode(), {"X-HDG-Route": "nowhere"}),
        ("PUT", json.dumps({"prompt": "x"}).encode(), {}),
        ("POST", json.dumps({**FAST, "prompt": "a fox"}).encode(), {"X-Request-Id": "same-id-1"}),
    ]
    answers = []
    for gw in (direct, routed):
        key = gw.create_tenant()["api_key"]
        seen = []
        for method, content, extra in cases:
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"} | extra
            headers = {k: v for k, v in headers.items() if v}
            resp = gw.client.request(method, "/v1/images/generations", content=content, headers=headers)
            body = resp.json()
            shape = body["error"] if "error" in body else sorted(body) + sorted(body["data"][0])
            seen.append((resp.status_code, resp.headers["content-type"], "x-request-id" in resp.headers, shape))
        assert seen[-1][0] == 200 and resp.headers["x-request-id"] == "same-id-1"
        metrics = gw.client.get("/metrics").text
        route = 'route="/v1/images/generations"'
        counted = [
            line for line in metrics.splitlines() if line.startswith("hdg_http_requests_total{") and route in line
        ]
        answers.append((seen, sorted(line.rsplit(" ", 1)[0] for line in counted)))
    assert answers[0] == answers[1]
    statuses = [status for status, *_ in answers[0][0]]
    assert statuses == [400, 404, 400, 415, 413, 401, 401, 400, 405, 200]


def test_direct_dispatch_takes_only_bare_request_endpoints_and_steps_aside_for_telemetry(tmp_path: Any) -> None:
    from fastapi import APIRouter, FastAPI

    from gateway.app import create_app
    from gateway.middleware import DirectRoutes
    from gateway.settings import Settings

    router = APIRouter()

    @router.post("/v1/things/{thing_id}")
    async def thing(thing_id: str) -> dict[str, str]:
        return {"id": thing_id}

    with pytest.raises(ValueError, match="bare Request"):
        DirectRoutes(FastAPI(), routes=list(router.routes), handlers={})  # type: ignore[arg-type]
    # FastAPI's tracing names a request's span in its router, so with it on every request goes through the router.
    for otel, present in ((False, True), (True, False)):
        app = create_app(Settings(data_dir=tmp_path / str(otel), otel=otel))
        assert any(m.cls is DirectRoutes for m in app.user_middleware) is present
