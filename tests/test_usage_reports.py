"""Usage reports per UTC day, model and backend: the tenant API, the admin API and the invoicing export."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text

from gateway.auth import create_tenant_with_key
from gateway.cli import main
from gateway.storage.db import open_database, session_factory
from gateway.storage.models import Prediction, UsageEvent
from tests.conftest import Gateway, GatewayFactory, fal_only
from tests.fakes.fal import FakeFal

FAST, DEV, FULL = "hidream-i1-fast", "hidream-i1-dev", "hidream-i1-full"
# A zone 14 hours ahead of UTC: a report that took the session's zone would put late-UTC events on the next day.
FAR_EAST = "Pacific/Kiritimati"


@dataclass(frozen=True)
class Account:
    tenant_id: str
    key_id: str
    api_key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@dataclass(frozen=True)
class Event:
    """A usage event to write, as the settle of a prediction would have written it at ``at``."""

    who: Account
    at: datetime
    model: str = FAST
    backend: str | None = "fal"
    images: int = 1
    price: str = "0.010486"
    status: str = "succeeded"
    width: int = 1024
    height: int = 1024


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


async def _write_events(url: str, events: list[Event]) -> str:
    """Write each event with its prediction; returns the database session's time zone."""
    async with open_database(url) as engine, session_factory(engine).begin() as session:
        for e in events:
            prediction = Prediction(
                tenant_id=e.who.tenant_id,
                api_key_id=e.who.key_id,
                model=e.model,
                status=e.status,
                prompt="a fox",
                params={},
                width=e.width,
                height=e.height,
                n=e.images,
                seed=1,
                created_at=e.at,
            )
            session.add(prediction)
            await session.flush()
            session.add(
                UsageEvent(
                    prediction_id=prediction.id,
                    tenant_id=e.who.tenant_id,
                    api_key_id=e.who.key_id,
                    model=e.model,
                    width=e.width,
                    height=e.height,
                    images=e.images,
                    backend=e.backend,
                    price_usd=Decimal(e.price),
                    latency_ms=100,
                    status=e.status,
                    created_at=e.at,
                )
            )
        if session.get_bind().dialect.name != "postgresql":
            return "UTC"
        return str(await session.scalar(text("SHOW timezone")))


async def _set_database_timezone(url: str, zone: str) -> None:
    """Make new sessions on this PostgreSQL database start in ``zone``, as a server configured so would."""
    conn = await asyncpg.connect(url.replace("+asyncpg", "", 1))
    try:
        await conn.execute(f"ALTER DATABASE \"{url.rsplit('/', 1)[1]}\" SET timezone TO '{zone}'")
    finally:
        await conn.close()


def _account(gw: Gateway, name: str) -> Account:
    body = gw.create_tenant(name)
    return Account(body["tenant_id"], body["key_id"], body["api_key"])


def _row(day: str, model: str, backend: str | None, images: int, mp: str, price: str, req: int, unb: int) -> Any:
    return {
        "date": day,
        "model": model,
        "backend": backend,
        "images": images,
        "megapixels": mp,
        "price_usd": price,
        "requests": req,
        "unbilled_requests": unb,
    }


def _cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str, *args: str) -> int:
    monkeypatch.setenv("HDG_DATABASE_URL", url)
    monkeypatch.setenv("HDG_DATA_DIR", str(tmp_path / "cli"))
    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture
def seeded(make_gateway: GatewayFactory, database_url: str) -> tuple[Gateway, Account, Account]:
    """A gateway whose database holds two tenants' events around the November/December/January boundaries."""
    if database_url.startswith("postgresql"):
        asyncio.run(_set_database_timezone(database_url, FAR_EAST))
    gw = make_gateway(database_url)
    a, b = _account(gw, "acme"), _account(gw, "globex")
    events = [
        Event(a, datetime(2026, 12, 1, 1, 59, 59, tzinfo=timezone(timedelta(hours=2)))),  # 2026-11-30 23:59:59Z
        Event(a, _utc(2026, 12, 1, 0, 0, 0), images=2, price="0.020972"),
        Event(a, _utc(2026, 12, 1, 0, 0, 1), price="0", status="failed"),
        Event(a, _utc(2026, 12, 1, 8, 30), backend="replicate", price="0.010000"),
        Event(a, _utc(2026, 12, 1, 9, 0), model=FULL, backend=None, price="0", status="failed"),
        Event(a, _utc(2026, 12, 1, 10, 0), price="0", status="canceled"),
        Event(a, _utc(2026, 12, 31, 23, 59, 59, 999_999), model=DEV, width=768, height=1360, price="0.031334"),
        Event(a, _utc(2027, 1, 1, 0, 0, 0)),
        Event(b, _utc(2026, 12, 1, 10, 0), images=4, price="0.041944"),
    ]
    zone = asyncio.run(_write_events(database_url, events))
    # On PostgreSQL the sessions really are far from UTC, so the day boundaries below prove the conversion.
    assert zone == (FAR_EAST if database_url.startswith("postgresql") else "UTC")
    return gw, a, b


A_DECEMBER = [
    _row("2026-12-01", FAST, "fal", 2, "2.097152", "0.020972", 1, 2),
    _row("2026-12-01", FAST, "replicate", 1, "1.048576", "0.010000", 1, 0),
    _row("2026-12-01", FULL, None, 0, "0.000000", "0.000000", 0, 1),
    _row("2026-12-31", DEV, "fal", 1, "1.044480", "0.031334", 1, 0),
]
A_DECEMBER_TOTAL = {
    "images": 4,
    "megapixels": "4.190208",
    "price_usd": "0.062306",
    "requests": 3,
    "unbilled_requests": 3,
}
B_DECEMBER = [_row("2026-12-01", FAST, "fal", 4, "4.194304", "0.041944", 1, 0)]


def test_tenant_report_groups_by_utc_day_model_and_backend(seeded: tuple[Gateway, Account, Account]) -> None:
    gw, a, b = seeded

    december = gw.client.get("/v1/usage", params={"period": "2026-12"}, headers=a.auth)

    assert december.status_code == 200, december.text
    assert december.json() == {
        "object": "usage.report",
        "period": {"start": "2026-12-01T00:00:00+00:00", "end": "2027-01-01T00:00:00+00:00"},
        "data": A_DECEMBER,
        "total": A_DECEMBER_TOTAL,
    }
    # 23:59:59 UTC stays on its day and in its month; 00:00:00 UTC starts the next one.
    november = gw.client.get("/v1/usage", params={"period": "2026-11"}, headers=a.auth).json()
    assert november["data"] == [_row("2026-11-30", FAST, "fal", 1, "1.048576", "0.010486", 1, 0)]
    january = gw.client.get("/v1/usage", params={"period": "2027-01"}, headers=a.auth).json()
    assert january["data"] == [_row("2027-01-01", FAST, "fal", 1, "1.048576", "0.010486", 1, 0)]
    # Tenant isolation: each key sees its own tenant's rows only.
    assert gw.client.get("/v1/usage", params={"period": "2026-12"}, headers=b.auth).json()["data"] == B_DECEMBER


def test_since_until_bounds_are_utc_and_half_open(seeded: tuple[Gateway, Account, Account]) -> None:
    gw, a, _b = seeded

    # Naive times are UTC; `until` is exclusive, so the event at midnight is left out.
    edge = gw.client.get(
        "/v1/usage", params={"since": "2026-11-30T23:59:59Z", "until": "2026-12-01T00:00:00"}, headers=a.auth
    ).json()
    assert [(r["date"], r["images"]) for r in edge["data"]] == [("2026-11-30", 1)]
    assert edge["period"] == {"start": "2026-11-30T23:59:59+00:00", "end": "2026-12-01T00:00:00+00:00"}

    # Unix seconds are accepted; a missing bound is open.
    since = int(_utc(2026, 12, 31).timestamp())
    tail = gw.client.get("/v1/usage", params={"since": since}, headers=a.auth).json()
    assert [(r["date"], r["model"]) for r in tail["data"]] == [("2026-12-31", DEV), ("2027-01-01", FAST)]
    assert tail["period"] == {"start": "2026-12-31T00:00:00+00:00", "end": None}
    assert tail["total"]["price_usd"] == str(Decimal("0.031334") + Decimal("0.010486"))

    future = gw.client.get("/v1/usage", params={"period": "2099-01"}, headers=a.auth).json()
    assert future["data"] == [] and future["total"]["price_usd"] == "0.000000" and future["total"]["images"] == 0


def test_csv_report_by_format_or_accept_header(seeded: tuple[Gateway, Account, Account]) -> None:
    gw, a, _b = seeded

    by_param = gw.client.get("/v1/usage", params={"period": "2026-12", "format": "csv"}, headers=a.auth)
    by_accept = gw.client.get("/v1/usage", params={"period": "2026-12"}, headers={**a.auth, "Accept": "text/csv"})

    assert by_param.headers["content-type"].startswith("text/csv") and by_param.text == by_accept.text
    lines = by_param.text.splitlines()
    assert lines[0] == "date,model,backend,images,megapixels,price_usd,requests,unbilled_requests"
    assert lines[1:] == [
        "2026-12-01,hidream-i1-fast,fal,2,2.097152,0.020972,1,2",
        "2026-12-01,hidream-i1-fast,replicate,1,1.048576,0.010000,1,0",
        "2026-12-01,hidream-i1-full,,0,0.000000,0.000000,0,1",
        "2026-12-31,hidream-i1-dev,fal,1,1.044480,0.031334,1,0",
    ]
    # format wins over Accept.
    explicit = gw.client.get(
        "/v1/usage", params={"period": "2026-12", "format": "json"}, headers={**a.auth, "Accept": "text/csv"}
    )
    assert explicit.json()["data"] == A_DECEMBER


def test_admin_report_spans_tenants_and_keeps_the_event_list(seeded: tuple[Gateway, Account, Account]) -> None:
    gw, a, b = seeded

    everyone = gw.admin("GET", "/admin/usage", params={"period": "2026-12"}).json()

    expected = sorted(
        [{"tenant_id": a.tenant_id, **r} for r in A_DECEMBER] + [{"tenant_id": b.tenant_id, **r} for r in B_DECEMBER],
        key=lambda r: (r["tenant_id"], r["date"], r["model"], r["backend"] or ""),
    )
    assert everyone["data"] == expected
    assert everyone["total"]["images"] == 8 and everyone["total"]["price_usd"] == "0.104250"
    only_b = gw.admin("GET", "/admin/usage", params={"period": "2026-12", "tenant_id": b.tenant_id}).json()
    assert only_b["data"] == [{"tenant_id": b.tenant_id, **B_DECEMBER[0]}]
    header = gw.admin("GET", "/admin/usage", params={"period": "2026-12", "format": "csv"}).text.splitlines()[0]
    assert header.startswith("tenant_id,date,model,backend,")
    assert gw.admin("GET", "/admin/usage").json()["period"]["start"].endswith("-01T00:00:00+00:00")
    assert gw.client.get("/admin/usage", headers=a.auth).status_code == 401

    events = gw.admin("GET", "/admin/usage/events", params={"tenant_id": b.tenant_id}).json()
    assert [(e["images"], e["price_usd"], e["status"]) for e in events["data"]] == [(4, "0.041944", "succeeded")]
    mine = gw.client.get("/v1/usage/events", params={"until": "2026-12-01T00:00:00Z"}, headers=a.auth).json()
    assert [e["created_at"] for e in mine["data"]] == ["2026-11-30T23:59:59+00:00"]


def test_report_of_real_generations_matches_their_events(
    make_gateway: GatewayFactory,
    database_url: str,
    fal: FakeFal,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gw = make_gateway(database_url, from_settings=True, **fal_only(fal))
    a = _account(gw, "acme")
    assert gw.generate(a.api_key).status_code == 200
    assert gw.generate(a.api_key, n=2).status_code == 200

    report = gw.client.get("/v1/usage", headers=a.auth).json()  # default: this UTC month
    events = gw.client.get("/v1/usage/events", headers=a.auth).json()["data"]

    assert report["period"]["start"] == datetime.now(UTC).strftime("%Y-%m-01T00:00:00+00:00")
    assert [e["backend"] for e in events] == ["fal", "fal"]
    days = sorted({e["created_at"][:10] for e in events})
    assert [(r["date"], r["model"], r["backend"]) for r in report["data"]] == [(d, FAST, "fal") for d in days]
    price = sum((Decimal(e["price_usd"]) for e in events), Decimal(0))
    assert price > 0
    assert report["total"] == {
        "images": 3,
        "megapixels": "3.145728",
        "price_usd": f"{price:.6f}",
        "requests": 2,
        "unbilled_requests": 0,
    }

    # The books of real generations balance; an event written behind the ledger's back does not.
    assert _cli(monkeypatch, tmp_path, database_url, "usage", "reconcile") == 0
    assert capsys.readouterr().out.startswith("reconcile: 0 mismatch(es); checked ")
    asyncio.run(_write_events(database_url, [Event(a, datetime.now(UTC))]))
    assert _cli(monkeypatch, tmp_path, database_url, "usage", "reconcile") == 1
    *mismatches, summary = capsys.readouterr().out.splitlines()
    assert mismatches and summary.startswith(f"reconcile: {len(mismatches)} mismatch(es); checked ")


def test_bad_report_parameters_are_400_with_param(sqlite_gateway: Gateway) -> None:
    a = _account(sqlite_gateway, "acme")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"period": "2026-13"}, "period"),
        ({"period": "abc"}, "period"),
        ({"period": "2026-1"}, "period"),
        ({"period": "0000-01"}, "period"),
        ({"period": "9999-12"}, "period"),
        ({"period": "2026-12", "since": "2026-12-01"}, "period"),
        ({"since": "2026-12-02", "until": "2026-12-01"}, "until"),
        ({"since": "abc"}, "since"),
        ({"since": "0001-01-01T00:00:00+05:00"}, "since"),
        ({"format": "xml"}, "format"),
    ]
    for params, param in cases:
        resp = sqlite_gateway.client.get("/v1/usage", params=params, headers=a.auth)
        assert resp.status_code == 400, (params, resp.text)
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, (params, error)
    admin = sqlite_gateway.admin("GET", "/admin/usage", params={"period": "2026-00"})
    assert admin.status_code == 400 and admin.json()["error"]["param"] == "period"
    # The event lists take the same times: outside the calendar once in UTC is a 400 there too, not a 500.
    for params, param in (
        ({"since": "0001-01-01T00:00:00+05:00"}, "since"),
        ({"until": "9999-12-31T23:59:59-05:00"}, "until"),
    ):
        for resp in (
            sqlite_gateway.client.get("/v1/usage/events", params=params, headers=a.auth),
            sqlite_gateway.admin("GET", "/admin/usage/events", params=params),
        ):
            assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


def test_sqlite_stores_utc_wall_time_text(sqlite_url: str) -> None:
    """What the SQLite day expression relies on: UTCDateTime writes the UTC time as sortable text."""

    async def seed_and_read() -> list[str]:
        async with open_database(sqlite_url) as engine, session_factory(engine).begin() as session:
            tenant, key, plaintext = await create_tenant_with_key(session, name="acme")
            at = datetime(2026, 12, 1, 1, 59, 59, tzinfo=timezone(timedelta(hours=2)))
        await _write_events(sqlite_url, [Event(Account(tenant.id, key.id, plaintext), at)])
        async with open_database(sqlite_url) as engine, engine.connect() as conn:
            rows = await conn.execute(text("SELECT created_at, date(created_at) FROM usage_events"))
            return [str(v) for v in rows.one()]

    assert asyncio.run(seed_and_read()) == ["2026-11-30 23:59:59.000000", "2026-11-30"]


def test_cli_export_is_the_invoicing_csv(
    seeded: tuple[Gateway, Account, Account],
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _gw, a, b = seeded

    assert _cli(monkeypatch, tmp_path, database_url, "usage", "export", "--period", "2026-12") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))

    expected = [{"tenant_id": a.tenant_id, **r} for r in A_DECEMBER] + [
        {"tenant_id": b.tenant_id, **r} for r in B_DECEMBER
    ]
    as_text = [{k: "" if v is None else str(v) for k, v in r.items()} for r in expected]
    assert rows == sorted(as_text, key=lambda r: (r["tenant_id"], r["date"], r["model"], r["backend"]))

    out = tmp_path / "b.json"
    args = ("usage", "export", "--period", "2026-12", "--tenant", b.tenant_id, "--format", "json", "--output", str(out))
    assert _cli(monkeypatch, tmp_path, database_url, *args) == 0
    assert json.loads(out.read_text())["data"] == [{"tenant_id": b.tenant_id, **B_DECEMBER[0]}]
    assert "wrote 1 rows" in capsys.readouterr().err

    assert _cli(monkeypatch, tmp_path, database_url, "usage", "events", "--tenant", b.tenant_id, "--json") == 0
    [event] = json.loads(capsys.readouterr().out)
    assert (event["tenant_id"], event["images"], event["price_usd"]) == (b.tenant_id, 4, "0.041944")

    assert _cli(monkeypatch, tmp_path, database_url, "usage", "export", "--period", "2026-13") == 2
    assert "Invalid period '2026-13'" in capsys.readouterr().err
    assert _cli(monkeypatch, tmp_path, database_url, "usage", "export", "--period", "2026-12", "--tenant", "ten_x") == 2
    assert "no tenant with id 'ten_x'" in capsys.readouterr().err
