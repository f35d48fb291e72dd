"""Edges a new user hit (issue 10): content types, strict numbers, exact budgets, key ids, opaque usage ids."""

from __future__ import annotations

import json

from tests.conftest import Gateway

CREATE = "/v1/models/hidream-ai/hidream-i1-fast/predictions"


def test_a_json_body_sent_as_text_plain_is_415_naming_the_content_type(sqlite_gateway: Gateway) -> None:
    key = sqlite_gateway.create_tenant()["api_key"]
    body = json.dumps({"model": "hidream-i1-fast", "prompt": "a fox"})
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "text/plain"}
    resp = sqlite_gateway.client.post("/v1/images/generations", content=body, headers=headers)
    assert resp.status_code == 415, resp.text
    error = resp.json()["error"]
    assert error["code"] == "unsupported_media_type" and "'text/plain'" in error["message"]
    problem = sqlite_gateway.client.post(CREATE, content=json.dumps({"input": {"prompt": "a"}}), headers=headers)
    assert problem.status_code == 415 and problem.headers["content-type"] == "application/problem+json"
    # A JSON media type with parameters, or a +json one, is JSON.
    ok = {"Authorization": f"Bearer {key}", "Content-Type": "application/json; charset=utf-8"}
    assert sqlite_gateway.client.post("/v1/images/generations", content="[]", headers=ok).status_code == 400


def test_numbers_must_be_numbers(sqlite_gateway: Gateway) -> None:
    key = sqlite_gateway.create_tenant()["api_key"]
    auth = {"Authorization": f"Bearer {key}"}
    for field, value in (("n", "2"), ("seed", "7"), ("num_inference_steps", True), ("guidance_scale", "3.5")):
        resp = sqlite_gateway.client.post(
            "/v1/images/generations", json={"model": "hidream-i1-fast", "prompt": "a", field: value}, headers=auth
        )
        assert resp.status_code == 400 and resp.json()["error"]["param"] == field, (field, resp.text)
    resp = sqlite_gateway.client.post(CREATE, json={"input": {"prompt": "a", "num_outputs": "2"}}, headers=auth)
    assert resp.status_code == 422 and resp.json()["invalid_fields"][0]["field"] == "input.num_outputs"


def test_budgets_show_as_enforced_and_both_key_routes_name_the_key_id(sqlite_gateway: Gateway) -> None:
    tenant = sqlite_gateway.create_tenant(monthly_budget_usd="0.015")
    assert tenant["tenant"]["monthly_budget_usd"] == "0.015"  # not rounded to 0.02, no trailing zeros
    listed = sqlite_gateway.admin("GET", "/admin/tenants").json()["data"]
    assert [t["monthly_budget_usd"] for t in listed] == ["0.015"]
    created = sqlite_gateway.admin("POST", f"/admin/tenants/{tenant['tenant_id']}/keys").json()
    assert created["key_id"] == created["id"] and created["key_id"].startswith("key_")
    assert tenant["key_id"].startswith("key_")


def test_usage_event_ids_are_opaque_and_tenants_do_not_see_our_costs(sqlite_gateway: Gateway) -> None:
    key = sqlite_gateway.create_tenant()["api_key"]
    assert sqlite_gateway.generate(key).status_code == 200
    [event] = sqlite_gateway.client.get("/v1/usage/events", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    # Not a counter (which would tell every tenant the gateway's total traffic): derived from the random job id.
    assert event["id"] == "use_" + event["prediction_id"].removeprefix("gen_")
    assert "cost_usd" not in event
    [admin_view] = sqlite_gateway.admin("GET", "/admin/usage/events").json()["data"]
    assert admin_view["id"] == event["id"] and "cost_usd" in admin_view
