"""The Replicate fake is only worth having if it behaves like api.replicate.com.

These tests check it three ways: every body against Replicate's own OpenAPI document, the official ``replicate``
client against the running fake, and each fault knob against what it promises.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from PIL import Image
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from replicate.client import Client
from replicate.exceptions import ModelError, ReplicateError

from tests.fakes.replicate import RESOLUTIONS, VERSIONS, FakeReplicate

# Replicate's published OpenAPI document (copy of 2026-03-16, as served at api.replicate.com/openapi.json).
SPEC_PATH = Path(__file__).parent / "fakes" / "replicate-openapi.json"
SPEC_URI = "urn:replicate-openapi"
MODEL = "prunaai/hidream-l1-fast"
BY_MODEL = "/models/{model_owner}/{model_name}/predictions"
PROMPT = {"prompt": "a lighthouse at dusk"}


def _nullable_to_json_schema(node: Any) -> Any:
    """Rewrite OpenAPI 3.0 ``nullable: true`` (which the 3.1 document still uses) as a JSON Schema null type.

    Without this, JSON Schema ignores ``nullable`` and the documented ``"error": null`` would fail validation.
    """
    if isinstance(node, list):
        return [_nullable_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _nullable_to_json_schema(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True and isinstance(node.get("type"), str):
        out["type"] = [node["type"], "null"]
    return out


class Spec:
    """Validators for the request and response bodies of Replicate's OpenAPI document."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.registry: Registry = Registry().with_resource(SPEC_URI, DRAFT202012.create_resource(document))

    def _validator(self, *pointer: str) -> Draft202012Validator:
        escaped = "/".join(part.replace("~", "~0").replace("/", "~1") for part in pointer)
        schema = {"$ref": f"{SPEC_URI}#/{escaped}"}
        return Draft202012Validator(schema, registry=self.registry, format_checker=Draft202012Validator.FORMAT_CHECKER)

    def check_request(self, path: str, body: dict[str, Any]) -> None:
        """Assert ``body`` is a valid request body for ``POST path``."""
        self._validator("paths", path, "post", "requestBody", "content", "application/json", "schema").validate(body)

    def check_response(self, path: str, method: str, response: httpx.Response) -> dict[str, Any]:
        """Assert ``response`` is one the spec documents for ``method path``, its body included; return the body."""
        documented = self.document["paths"][path][method]["responses"]
        assert str(response.status_code) in documented, response.text
        assert response.headers["content-type"] == "application/json"
        body: dict[str, Any] = response.json()
        pointer = ("paths", path, method, "responses", str(response.status_code), "content", "application/json")
        self._validator(*pointer, "schema").validate(body)
        for prediction in body.get("results", [body]):  # the formats the validator cannot check without extras
            for url in prediction["urls"].values():
                assert httpx.URL(url).scheme in ("http", "https")
            for key in ("created_at", "started_at", "completed_at", "deadline"):
                if key in prediction:
                    assert datetime.fromisoformat(prediction[key]).tzinfo is not None
        return body


@pytest.fixture(scope="module")
def spec() -> Spec:
    return Spec(_nullable_to_json_schema(json.loads(SPEC_PATH.read_text())))


@pytest.fixture(scope="module")
def running() -> Iterator[FakeReplicate]:
    with FakeReplicate() as fake:
        yield fake


@pytest.fixture
def fake(running: FakeReplicate) -> FakeReplicate:
    """The module's fake, wiped clean (starting and stopping a server per test would double the run time)."""
    running.reset()
    if running.server.server is None:  # a test that stopped it failed before starting it again
        running.start()
    return running


@pytest.fixture
def api(fake: FakeReplicate) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{fake.url}/v1", headers={"Authorization": f"Bearer {fake.token}"}) as client:
        yield client


@pytest.fixture
def client(fake: FakeReplicate, monkeypatch: pytest.MonkeyPatch) -> Client:
    monkeypatch.setenv("REPLICATE_POLL_INTERVAL", "0.01")  # read when the client is built
    return Client(api_token=fake.token, base_url=fake.url)


def create(api: httpx.Client, spec: Spec, body: dict[str, Any], model: str = MODEL, **headers: str) -> dict[str, Any]:
    """Create a prediction through the official-model route, checking request and response against the spec."""
    spec.check_request(BY_MODEL, body)
    response = api.post(f"/models/{model}/predictions", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return spec.check_response(BY_MODEL, "post", response)


def get(api: httpx.Client, spec: Spec, pid: str) -> dict[str, Any]:
    return spec.check_response("/predictions/{prediction_id}", "get", api.get(f"/predictions/{pid}"))


def image_of(url: str) -> Image.Image:
    response = httpx.get(url)
    assert response.status_code == 200
    image = Image.open(io.BytesIO(response.content))
    assert response.headers["content-type"] == Image.MIME[image.format or ""]
    return image


# --- the spec -------------------------------------------------------------------------------------------------


def test_create_by_model_answers_a_starting_prediction_as_documented(
    fake: FakeReplicate, api: httpx.Client, spec: Spec
) -> None:
    body = {"input": PROMPT, "webhook": "https://example.com/hook", "webhook_events_filter": ["start", "completed"]}
    prediction = create(api, spec, body)
    pid = prediction["id"]
    assert prediction["status"] == "starting" and prediction["output"] is None and prediction["error"] is None
    assert prediction["model"] == MODEL and prediction["version"] == VERSIONS[MODEL]
    assert prediction["input"] == PROMPT and prediction["source"] == "api" and prediction["data_removed"] is False
    assert prediction["urls"]["get"] == f"{fake.url}/v1/predictions/{pid}"
    assert prediction["urls"]["cancel"] == f"{fake.url}/v1/predictions/{pid}/cancel"
    assert len(pid) == 26 and pid.isalnum()
    assert fake.creates == 1 and fake.predictions[pid]["id"] == pid


@pytest.mark.parametrize(
    "version",
    [
        "prunaai/hidream-l1-dev",
        f"prunaai/hidream-l1-dev:{VERSIONS['prunaai/hidream-l1-dev']}",
        VERSIONS["prunaai/hidream-l1-dev"],
    ],
    ids=["owner/name", "owner/name:id", "id"],
)
def test_create_by_version_accepts_the_three_reference_forms(api: httpx.Client, spec: Spec, version: str) -> None:
    body = {"version": version, "input": PROMPT}
    spec.check_request("/predictions", body)
    prediction = spec.check_response("/predictions", "post", api.post("/predictions", json=body))
    assert prediction["model"] == "prunaai/hidream-l1-dev"
    assert prediction["version"] == VERSIONS["prunaai/hidream-l1-dev"]


def test_get_follows_starting_processing_succeeded(fake: FakeReplicate, api: httpx.Client, spec: Spec) -> None:
    fake.faults.processing_s = 100  # starting for 25 s, then processing; the fake's clock is moved, not waited on
    pid = create(api, spec, {"input": PROMPT | {"seed": 7}})["id"]
    assert get(api, spec, pid)["status"] == "starting"
    fake.advance(30)
    processing = get(api, spec, pid)
    assert processing["status"] == "processing" and "started_at" in processing and processing["output"] is None
    fake.advance(80)
    done = get(api, spec, pid)
    assert done["status"] == "succeeded" and done["logs"] == "Using seed: 7\n"
    assert done["metrics"]["predict_time"] == pytest.approx(75) and done["metrics"]["total_time"] == pytest.approx(100)
    assert datetime.fromisoformat(done["completed_at"]) - datetime.fromisoformat(done["created_at"]) == pytest.approx(
        timedelta(seconds=100), abs=timedelta(milliseconds=1)
    )
    assert done["output"] == f"{fake.url}/files/{pid}.webp"
    assert image_of(done["output"]).size == (1024, 1024)


def test_cancel_stops_a_running_prediction_and_leaves_a_finished_one(
    fake: FakeReplicate, api: httpx.Client, spec: Spec
) -> None:
    fake.faults.processing_s = 100
    pid = create(api, spec, {"input": PROMPT})["id"]
    canceled = spec.check_response(
        "/predictions/{prediction_id}/cancel", "post", api.post(f"/predictions/{pid}/cancel")
    )
    assert canceled["status"] == "canceled" and canceled["output"] is None and "completed_at" in canceled
    fake.advance(200)  # it would have succeeded by now
    assert get(api, spec, pid)["status"] == "canceled"
    fake.faults.processing_s = 0
    done = create(api, spec, {"input": PROMPT})["id"]
    again = spec.check_response("/predictions/{prediction_id}/cancel", "post", api.post(f"/predictions/{done}/cancel"))
    assert again["status"] == "succeeded" and again["output"]


def test_list_is_newest_first_in_pages_of_100_linked_by_cursor(
    fake: FakeReplicate, api: httpx.Client, spec: Spec
) -> None:
    ids = [create(api, spec, {"input": PROMPT})["id"] for _ in range(101)]
    first = spec.check_response("/predictions", "get", api.get("/predictions"))
    assert [p["id"] for p in first["results"]] == ids[::-1][:100]
    assert first["previous"] is None and "cursor=" in first["next"] and first["next"].startswith(fake.url)
    second = spec.check_response("/predictions", "get", api.get(first["next"]))  # fetched as-is, like the client
    assert [p["id"] for p in second["results"]] == ids[:1] and second["next"] is None
    back = spec.check_response("/predictions", "get", api.get(second["previous"]))
    assert [p["id"] for p in back["results"]] == [p["id"] for p in first["results"]]
    assert back["previous"] is None
    assert api.get("/predictions", params={"source": "web"}).json()["results"] == []


# --- the official client ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wait", [True, False], ids=["prefer-wait", "polling"])
def test_client_run_returns_the_output_of_the_requested_size(fake: FakeReplicate, client: Client, wait: bool) -> None:
    fake.faults.processing_s = 0.2
    resolution = "1360 × 768 (Landscape)"
    output = client.run(MODEL, input=PROMPT | {"resolution": resolution, "output_format": "png"}, wait=wait)
    # replicate 1.x wraps only https: and data: URLs in FileOutput (helpers.transform_output); the fake is http.
    assert isinstance(output, str) and output.startswith(f"{fake.url}/files/")
    image = image_of(output)
    assert image.format == "PNG" and image.size == RESOLUTIONS[resolution] == (1360, 768)
    assert fake.creates == 1


def test_client_predictions_create_get_cancel_list(fake: FakeReplicate, client: Client) -> None:
    fake.faults.processing_s = 100
    created = client.predictions.create(model=MODEL, input=PROMPT)
    assert created.status == "starting" and created.urls is not None
    assert client.predictions.get(created.id).status == "starting"
    by_id = client.predictions.create(version=VERSIONS["prunaai/hidream-l1-full"], input=PROMPT)
    assert by_id.model == "prunaai/hidream-l1-full"
    canceled = client.predictions.cancel(created.id)
    assert canceled.status == "canceled"
    page = client.predictions.list()
    assert [p.id for p in page] == [by_id.id, created.id] and page.next is None
    fake.advance(100)
    by_id.reload()
    assert by_id.status == "succeeded" and by_id.output == f"{fake.url}/files/{by_id.id}.webp"


def test_client_surfaces_failed_jobs_and_invalid_input(fake: FakeReplicate, client: Client) -> None:
    with pytest.raises(ReplicateError) as invalid:
        client.predictions.create(model=MODEL, input=PROMPT | {"resolution": "1024x1024"})
    assert invalid.value.status == 422 and "input.resolution" in (invalid.value.detail or "")
    fake.faults.fail_jobs = True
    with pytest.raises(ModelError) as failed:
        client.run(MODEL, input=PROMPT)
    assert failed.value.prediction.status == "failed" and "CUDA" in (failed.value.prediction.error or "")


# --- inputs ---------------------------------------------------------------------------------------------------


def test_every_resolution_maps_to_its_size(fake: FakeReplicate, api: httpx.Client, spec: Spec) -> None:
    for resolution, size in RESOLUTIONS.items():
        body = {"input": PROMPT | {"resolution": resolution, "output_format": "jpg", "output_quality": 50}}
        prediction = create(api, spec, body, model="prunaai/hidream-l1-full", Prefer="wait")
        image = image_of(prediction["output"])
        assert (image.format, image.size) == ("JPEG", size)
        assert resolution.split(" (")[0] == f"{size[0]} × {size[1]}"


@pytest.mark.parametrize(
    ("model", "bad", "field"),
    [
        (MODEL, {}, "prompt"),
        (MODEL, {"prompt": 5}, "input.prompt"),
        (MODEL, PROMPT | {"resolution": "1024 x 1024 (Square)"}, "input.resolution"),
        (MODEL, PROMPT | {"seed": "42"}, "input.seed"),
        (MODEL, PROMPT | {"seed": True}, "input.seed"),
        (MODEL, PROMPT | {"output_format": "gif"}, "input.output_format"),
        (MODEL, PROMPT | {"output_quality": 101}, "input.output_quality"),
        (MODEL, PROMPT | {"output_quality": -1}, "input.output_quality"),
        (MODEL, PROMPT | {"model_type": "turbo"}, "input.model_type"),
        (MODEL, PROMPT | {"speed_mode": 1}, "input.speed_mode"),
        (MODEL, PROMPT | {"negative_prompt": ["blur"]}, "input.negative_prompt"),
        ("prunaai/hidream-l1-dev", PROMPT | {"output_quality": 80.0}, "input.output_quality"),
    ],
)
def test_invalid_input_is_422_naming_the_field(
    fake: FakeReplicate, api: httpx.Client, model: str, bad: dict[str, Any], field: str
) -> None:
    response = api.post(f"/models/{model}/predictions", json={"input": bad})
    assert response.status_code == 422 and response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 422 and problem["title"] == "Input validation failed"
    assert field in problem["detail"] and field in json.dumps(problem["invalid_fields"])
    assert fake.creates == 0


def test_unknown_inputs_are_ignored_as_on_replicate(fake: FakeReplicate, api: httpx.Client, spec: Spec) -> None:
    body = {"input": PROMPT | {"negative_prompt": "blur", "resolutoin": "768 × 1360 (Portrait)"}}
    prediction = create(api, spec, body, model="prunaai/hidream-l1-full", Prefer="wait")
    assert prediction["status"] == "succeeded" and prediction["input"] == body["input"]
    assert image_of(prediction["output"]).size == (1024, 1024)  # the misspelt option fell back to the default


@pytest.mark.parametrize(
    ("path", "body", "status", "word"),
    [
        ("/models/prunaai/hidream-l1-fast/predictions", {"inputs": PROMPT}, 422, "inputs"),
        ("/models/prunaai/hidream-l1-fast/predictions", {"input": PROMPT, "version": "x"}, 422, "version"),
        (
            "/models/prunaai/hidream-l1-fast/predictions",
            {"input": PROMPT, "webhook_events_filter": ["x"]},
            422,
            "webhook",
        ),
        ("/predictions", {"input": PROMPT}, 422, "version"),
        ("/models/prunaai/hidream-i1-fast/predictions", {"input": PROMPT}, 404, "hidream-i1-fast"),
        ("/predictions", {"version": "acme/other", "input": PROMPT}, 404, "acme/other"),
        ("/predictions", {"version": "0" * 64, "input": PROMPT}, 422, "0" * 64),
        ("/predictions", {"version": f"{MODEL}:{'0' * 64}", "input": PROMPT}, 422, "0" * 64),
    ],
)
def test_bad_requests_are_problem_details(
    fake: FakeReplicate, api: httpx.Client, path: str, body: dict[str, Any], status: int, word: str
) -> None:
    response = api.post(path, json=body)
    assert response.status_code == status and response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == status and word in response.json()["detail"]
    assert fake.creates == 0


def test_unknown_prediction_and_non_json_body(api: httpx.Client) -> None:
    for response in (api.get("/predictions/nope"), api.post("/predictions/nope/cancel")):
        assert response.status_code == 404 and response.json()["status"] == 404
    response = api.post(f"/models/{MODEL}/predictions", content=b"{", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.headers["content-type"] == "application/problem+json"


# --- faults and headers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Token wrong", "r8_fake_token", "Basic r8_fake_token"])
def test_missing_or_wrong_token_is_401(fake: FakeReplicate, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.post(f"{fake.url}/v1/models/{MODEL}/predictions", json={"input": PROMPT}, headers=headers)
    assert response.status_code == 401 and response.headers["content-type"] == "application/problem+json"
    assert response.json()["title"] == "Unauthenticated" and response.json()["status"] == 401
    assert fake.creates == 0


def test_legacy_token_scheme_is_accepted(fake: FakeReplicate) -> None:
    response = httpx.get(f"{fake.url}/v1/predictions", headers={"Authorization": f"Token {fake.token}"})
    assert response.status_code == 200 and response.json()["results"] == []


def test_throttle_is_429_with_retry_after(fake: FakeReplicate, api: httpx.Client) -> None:
    fake.faults.throttle, fake.faults.retry_after_s = True, 3
    response = api.post(f"/models/{MODEL}/predictions", json={"input": PROMPT})
    assert response.status_code == 429 and response.headers["retry-after"] == "3"
    assert response.json()["detail"].startswith("Request was throttled.")
    assert fake.creates == 0
    fake.faults.throttle = False
    assert api.post(f"/models/{MODEL}/predictions", json={"input": PROMPT}).status_code == 201


def test_error_rate_one_is_always_500(fake: FakeReplicate, api: httpx.Client) -> None:
    fake.faults.error_rate = 1.0
    for response in (api.get("/predictions"), api.post(f"/models/{MODEL}/predictions", json={"input": PROMPT})):
        assert response.status_code == 500 and response.json()["status"] == 500
    assert fake.creates == 0


def test_malformed_is_200_with_a_body_that_is_not_json(fake: FakeReplicate, api: httpx.Client) -> None:
    fake.faults.malformed = True
    response = api.get("/predictions")
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_latency_delays_answers(fake: FakeReplicate, api: httpx.Client) -> None:
    fake.faults.latency_s = 0.3
    started = time.monotonic()
    assert api.get("/predictions").status_code == 200
    assert time.monotonic() - started >= 0.3


def test_hang_never_answers_until_cleared(fake: FakeReplicate, api: httpx.Client) -> None:
    fake.faults.hang = True
    with pytest.raises(httpx.ReadTimeout):
        api.get("/predictions", timeout=0.5)
    fake.faults.hang = False
    assert api.get("/predictions").status_code == 200


def test_stop_drops_a_hung_request_and_start_comes_back_on_the_same_port(
    fake: FakeReplicate, api: httpx.Client, spec: Spec
) -> None:
    pid, url = create(api, spec, {"input": PROMPT})["id"], fake.url
    fake.faults.hang = True
    outcome: list[BaseException] = []

    def hung() -> None:
        try:
            httpx.get(f"{url}/v1/predictions", headers=api.headers, timeout=10)
        except httpx.HTTPError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=hung)
    thread.start()
    deadline = time.monotonic() + 5
    while not fake.hanging and time.monotonic() < deadline:  # until the request is being held
        time.sleep(0.01)
    fake.stop()
    thread.join(timeout=5)
    assert fake.hanging == 0 and len(outcome) == 1  # dropped, not answered
    assert isinstance(outcome[0], httpx.RemoteProtocolError | httpx.ReadError)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/v1/predictions")
    fake.faults.hang = False
    fake.start()
    assert fake.url == url and get(api, spec, pid)["status"] == "succeeded"  # predictions survive a restart


def test_output_404_breaks_only_the_file(fake: FakeReplicate, api: httpx.Client, spec: Spec) -> None:
    prediction = create(api, spec, {"input": PROMPT}, Prefer="wait")
    fake.faults.output_404 = True
    assert httpx.get(prediction["output"]).status_code == 404
    assert get(api, spec, prediction["id"])["status"] == "succeeded"
    fake.faults.output_404 = False
    assert image_of(prediction["output"]).size == (1024, 1024)


def test_fail_jobs_ends_failed_with_an_error(fake: FakeReplicate, api: httpx.Client, spec: Spec) -> None:
    fake.faults.fail_jobs = True
    failed = create(api, spec, {"input": PROMPT}, Prefer="wait")
    assert failed["status"] == "failed" and failed["output"] is None and failed["error"]
    assert fake.creates == 1  # a failed job was still created (and, on Replicate, billed)
    fake.faults.fail_jobs, fake.faults.processing_s = False, 10
    pid = create(api, spec, {"input": PROMPT})["id"]
    fake.faults.fail_jobs = True  # a flip after creation does not rewrite a job's fate
    fake.advance(11)
    assert get(api, spec, pid)["status"] == "succeeded"


def test_prefer_wait_holds_until_terminal_when_quick(fake: FakeReplicate, api: httpx.Client, spec: Spec) -> None:
    fake.faults.processing_s = 0.3
    started = time.monotonic()
    response = api.post(f"/models/{MODEL}/predictions", json={"input": PROMPT}, headers={"Prefer": "wait"})
    assert 0.3 <= time.monotonic() - started < 2
    assert response.status_code == 201 and response.headers["preference-applied"] == "wait=60"
    prediction = spec.check_response(BY_MODEL, "post", response)
    assert prediction["status"] == "succeeded" and prediction["output"]


def test_prefer_wait_answers_starting_when_the_wait_runs_out(
    fake: FakeReplicate, api: httpx.Client, spec: Spec
) -> None:
    fake.faults.processing_s = 30
    started = time.monotonic()
    response = api.post(f"/models/{MODEL}/predictions", json={"input": PROMPT}, headers={"Prefer": "wait=1"})
    assert 1 <= time.monotonic() - started < 3
    assert response.status_code == 201 and response.headers["preference-applied"] == "wait=1"
    prediction = spec.check_response(BY_MODEL, "post", response)
    assert prediction["status"] == "starting" and prediction["output"] is None  # what replicate.run() relies on


@pytest.mark.parametrize(
    ("processing_s", "status", "predict_time"),
    [(16, "canceled", 1.0), (60, "aborted", None)],
    ids=["running", "queued"],
)
def test_cancel_after_ends_a_prediction_at_its_deadline(
    fake: FakeReplicate, api: httpx.Client, spec: Spec, processing_s: float, status: str, predict_time: float | None
) -> None:
    fake.faults.processing_s = processing_s  # starts after processing_s / 4: 4 s (running at 5 s) or 15 s (not yet)
    prediction = create(api, spec, {"input": PROMPT}, **{"Cancel-After": "5s"})
    deadline = datetime.fromisoformat(prediction["deadline"])
    assert deadline - datetime.fromisoformat(prediction["created_at"]) == timedelta(seconds=5)
    fake.advance(4.9)
    assert get(api, spec, prediction["id"])["status"] in ("starting", "processing")
    fake.advance(0.2)
    ended = get(api, spec, prediction["id"])
    assert ended["status"] == status and datetime.fromisoformat(ended["completed_at"]) == deadline
    assert ended["metrics"].get("predict_time") == pytest.approx(predict_time)


@pytest.mark.parametrize(("value", "seconds"), [("30", 30), ("90s", 90), ("5m", 300), ("1h30m", 5400)])
def test_cancel_after_durations(api: httpx.Client, spec: Spec, value: str, seconds: int) -> None:
    prediction = create(api, spec, {"input": PROMPT}, **{"Cancel-After": value})
    lifetime = datetime.fromisoformat(prediction["deadline"]) - datetime.fromisoformat(prediction["created_at"])
    assert lifetime == timedelta(seconds=seconds)


@pytest.mark.parametrize("value", ["4s", "soon", "1d"])
def test_cancel_after_below_5s_or_unparseable_is_refused(fake: FakeReplicate, api: httpx.Client, value: str) -> None:
    response = api.post(f"/models/{MODEL}/predictions", json={"input": PROMPT}, headers={"Cancel-After": value})
    assert response.status_code == 400 and value in response.json()["detail"]
    assert fake.creates == 0


def test_data_is_removed_after_an_hour(fake: FakeReplicate, api: httpx.Client, spec: Spec) -> None:
    prediction = create(api, spec, {"input": PROMPT}, Prefer="wait")
    fake.advance(3601)
    removed = get(api, spec, prediction["id"])
    assert removed["data_removed"] is True and removed["output"] is None and removed["status"] == "succeeded"
    assert httpx.get(prediction["output"]).status_code == 404
