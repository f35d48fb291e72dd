"""The ``hidream-gateway`` command as an operator meets it: help, tables and JSON, errors, progress, pipes, demo.

Most tests run the installed console script in a subprocess, as a shell would; help is rendered with typer's runner.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from gateway.auth import create_tenant_with_key
from gateway.cli import COMMAND, app, parse
from gateway.errors import TenantExists
from gateway.storage.db import open_database, session_factory
from gateway.storage.models import Prediction, UsageEvent
from tests.conftest import FAST, GatewayFactory
from tests.fakes.server import free_port

CLI = str(Path(sys.executable).parent / "hidream-gateway")
MODEL = FAST["model"]


def cli_env(data_dir: Path, database_url: str, **extra: str) -> dict[str, str]:
    """The environment of a CLI run: only these settings (none from the test runner's own HDG_*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HDG_", "REPLICATE_", "FAL_"))}
    return env | {"HDG_DATA_DIR": str(data_dir), "HDG_DATABASE_URL": database_url} | extra


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=120, check=False)


def ok_json(env: dict[str, str], *args: str) -> Any:
    done = run(env, *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def env(tmp_path: Path, sqlite_url: str) -> dict[str, str]:
    return cli_env(tmp_path / "data", sqlite_url)


# --- help ----------------------------------------------------------------------------------------------------


def leaves(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every runnable command under ``command``, with the words that name it."""
    for name, sub in getattr(command, "commands", {}).items():
        if getattr(sub, "commands", None):
            yield from leaves(sub, (*path, name))
        else:
            yield (*path, name), sub


def test_help_lists_every_command_and_documents_every_option() -> None:
    runner = CliRunner()
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert top.exit_code == 0
    for name in ("serve", "demo", "worker", "db", "tenants", "keys", "usage"):
        assert f" {name} " in top.output, name
    found = {" ".join(path) for path, _ in leaves(COMMAND)}
    assert found == {
        "serve",
        "demo",
        "worker",
        "db upgrade",
        "tenants create",
        "tenants list",
        "keys create",
        "keys list",
        "keys revoke",
        "usage events",
        "usage export",
        "usage reconcile",
    }
    for path, command in leaves(COMMAND):
        assert command.help, path
        shown = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "250"})
        assert shown.exit_code == 0, path
        for param in command.params:
            assert param.help and param.help in shown.output, (path, param.name)
            if param.param_type_name == "option" and not param.is_flag and not param.required:
                # Every option with a value shows its default, "no limit" and the like included.
                line = next(line for line in shown.output.splitlines() if param.opts[0] in line)
                assert "[default: " in line, (path, param.name)


def test_the_infra_checks_parse_without_running() -> None:
    parsed = parse(["serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "4"])  # noqa: S104
    assert (parsed.command, parsed.params) == ("serve", {"host": "0.0.0.0", "port": 8000, "workers": 4})  # noqa: S104
    assert parse(["usage", "reconcile", "--repair"]).params == {"repair": True}
    for bad in (["serve", "--bogus"], ["nope"], ["tenants", "create", "x", "--rpm", "0"], ["db"]):
        with pytest.raises(typer.TyperException):
            parse(bad)


# --- tenants and keys ------------------------------------------------------------------------------------------


def test_tenant_names_are_unique_regardless_of_case(tmp_path: Path, database_url: str) -> None:
    env = cli_env(tmp_path / "data", database_url)
    first = ok_json(env, "tenants", "create", "Acme")
    again = run(env, "tenants", "create", "ACME")
    assert again.returncode == 2 and not again.stdout and "Traceback" not in again.stderr
    assert again.stderr == (
        f"hidream-gateway: A tenant named 'Acme' already exists (id {first['tenant_id']}); "
        "names are unique regardless of case.\n"
    )
    assert [t["name"] for t in ok_json(env, "tenants", "list", "--json")] == ["Acme"]


def test_the_admin_api_answers_409_for_a_taken_name(make_gateway: GatewayFactory, database_url: str) -> None:
    gateway = make_gateway(database_url)
    gateway.create_tenant("Globex")
    resp = gateway.admin("POST", "/admin/tenants", json={"name": "globex"})
    assert resp.status_code == 409
    error = resp.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "tenant_exists", "name")
    assert "'Globex' already exists" in error["message"]
    assert [t["name"] for t in gateway.admin("GET", "/admin/tenants").json()["data"]] == ["Globex"]


def test_a_name_taken_by_a_concurrent_create_is_still_tenant_exists(postgres_url: str) -> None:
    """Two creates that both pass the check: the unique index decides, and the loser gets TenantExists."""

    async def race() -> None:
        async with open_database(postgres_url) as engine:
            sessions = session_factory(engine)

            async def second() -> None:
                async with sessions.begin() as session:
                    await create_tenant_with_key(session, name="INITECH")

            async with sessions.begin() as session:
                await create_tenant_with_key(session, name="Initech")
                loser = asyncio.create_task(second())
                await asyncio.sleep(0.5)
                assert not loser.done()  # past the check (it cannot see this uncommitted row), waiting on the index
            with pytest.raises(TenantExists, match="'INITECH' already exists"):
                await loser

    asyncio.run(race())


def test_keys_list_shows_every_key_of_a_tenant_and_never_a_secret(env: dict[str, str]) -> None:
    tenant = ok_json(env, "tenants", "create", "acme")
    second = ok_json(env, "keys", "create", tenant["tenant_id"])
    ok_json(env, "keys", "revoke", tenant["key_id"])
    listed = ok_json(env, "keys", "list", tenant["tenant_id"], "--json")
    assert [(k["id"], k["revoked_at"] is not None) for k in listed] == [
        (tenant["key_id"], True),
        (second["key_id"], False),
    ]
    table = run(env, "keys", "list", tenant["tenant_id"])
    assert table.returncode == 0 and "PREFIX" in table.stdout
    assert tenant["key_id"] in table.stdout and second["key_id"] in table.stdout
    for output in (json.dumps(listed), table.stdout):
        assert tenant["api_key"] not in output and second["api_key"] not in output
    missing = run(env, "keys", "list", "ten_missing")
    assert missing.returncode == 2 and missing.stderr == "hidream-gateway: no tenant with id 'ten_missing'\n"


def test_tables_show_cells_whole_and_as_written(env: dict[str, str]) -> None:
    """Piped, a table is as wide as it needs (no cell cut to 80 columns); a name is text, never Rich markup."""
    long_name, markup = "a" * 150, "[bold]Initech[/bold]"
    made = [ok_json(env, "tenants", "create", name, "--monthly-budget-usd", "0.015") for name in (long_name, markup)]
    table = run(env, "tenants", "list")
    assert table.returncode == 0
    for tenant, name in zip(made, (long_name, markup), strict=True):
        [row] = [line for line in table.stdout.splitlines() if tenant["tenant_id"] in line]
        assert name in row and "0.015" in row and "0.015000" not in row


# --- usage events ----------------------------------------------------------------------------------------------


async def seed_events(url: str, count: int) -> str:
    """A tenant with ``count`` usage events, each with its prediction; returns the tenant's id."""
    async with open_database(url) as engine, session_factory(engine).begin() as session:
        tenant, key, _ = await create_tenant_with_key(session, name="acme")
        for i in range(count):
            prediction = Prediction(
                tenant_id=tenant.id,
                api_key_id=key.id,
                model=MODEL,
                status="succeeded",
                prompt="a fox",
                params={},
                width=1024,
                height=1024,
                n=1,
                seed=i,
            )
            session.add(prediction)
            await session.flush()
            session.add(
                UsageEvent(
                    prediction_id=prediction.id,
                    tenant_id=tenant.id,
                    api_key_id=key.id,
                    model=MODEL,
                    width=1024,
                    height=1024,
                    images=1,
                    backend="local",
                    price_usd=Decimal("0.010486"),
                    latency_ms=100,
                    status="succeeded",
                )
            )
        return tenant.id


def test_usage_events_as_a_table_json_or_csv(env: dict[str, str]) -> None:
    tenant_id = asyncio.run(seed_events(env["HDG_DATABASE_URL"], 2))
    events = ok_json(env, "usage", "events", "--json")
    assert events == ok_json(env, "usage", "events", "--format", "json")
    assert [e["tenant_id"] for e in events] == [tenant_id, tenant_id]
    table = run(env, "usage", "events")
    assert table.returncode == 0 and "PRICE USD" in table.stdout
    for event in events:
        [row] = [line for line in table.stdout.splitlines() if event["prediction_id"] in line]
        assert "1024x1024" in row and "0.010486" in row
    csv_lines = run(env, "usage", "events", "--format", "csv").stdout.splitlines()
    assert csv_lines[0].startswith("id,created_at,tenant_id") and len(csv_lines) == 3


def test_a_closed_pipe_ends_the_command_quietly(env: dict[str, str]) -> None:
    """``usage events --format csv | head -1``: the reader goes away after one line; no traceback follows."""
    asyncio.run(seed_events(env["HDG_DATABASE_URL"], 1500))  # ~300 kB of CSV: far more than a pipe holds
    proc = subprocess.Popen(
        [CLI, "usage", "events", "--format", "csv"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"id,created_at,")
    proc.stdout.close()  # as `head -1` exits
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and "Exception ignored" not in stderr


# --- progress, start-up errors, demo --------------------------------------------------------------------------


def test_long_steps_show_a_spinner_on_a_terminal_and_a_line_in_logs(env: dict[str, str]) -> None:
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [CLI, "db", "upgrade"], env=env | {"TERM": "xterm"}, stdout=subprocess.PIPE, stderr=terminal
    )
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert proc.wait(timeout=60) == 0
    text = shown.decode()
    assert "\x1b[?25l" in text and "Migrating the database..." in text  # a live display (the cursor hidden)
    assert "Database schema is up to date" in text

    logged = run(env, "db", "upgrade")  # stderr is a pipe here, as under Docker or systemd
    assert logged.stderr.startswith("Migrating the database...\nDatabase schema is up to date (")
    assert "\x1b" not in logged.stderr


@pytest.mark.parametrize("args", [["serve"], ["serve", "--workers", "2"], ["demo"]])
def test_a_missing_credential_stops_the_start_in_one_line(tmp_path: Path, sqlite_url: str, args: list[str]) -> None:
    env = cli_env(tmp_path / "data", sqlite_url, HDG_BACKENDS="replicate")
    done = run(env, *args, "--port", str(free_port()))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("hidream-gateway: ") and "REPLICATE_API_TOKEN" in line
    assert not (tmp_path / "gateway.db").exists()  # stopped before it migrated anything


def test_demo_prints_the_key_once_ready_and_reuses_the_demo_tenant(tmp_path: Path, sqlite_url: str) -> None:
    env = cli_env(tmp_path / "data", sqlite_url, PYTHONUNBUFFERED="1")
    existing = ok_json(env, "tenants", "create", "Demo")  # `demo` reuses it, whatever the case
    port = free_port()
    log = (tmp_path / "demo.log").open("w+")
    proc = subprocess.Popen([CLI, "demo", "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout

    def pump() -> None:
        for line in stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    before: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while "API key (shown once)" not in (line := lines.get(timeout=max(1, deadline - time.monotonic()))):
            assert proc.poll() is None, Path(log.name).read_text()
            before.append(line)
        assert not [line for line in before if "/readyz" in line]  # its own polls stay out of the access log
        # Announced only when ready: /readyz answers 200 already, and the printed key generates at once.
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/readyz").status_code == 200
        tenant_id, api_key = line.split("Demo tenant ")[1].split("; API key (shown once): ")
        assert tenant_id == existing["tenant_id"]
        body = {**FAST, "prompt": "a lighthouse"}
        generated = httpx.post(
            f"{url}/v1/images/generations",
            json=body,
            headers={"Authorization": f"Bearer {api_key.strip()}"},
            timeout=60,
        )
        assert generated.status_code == 200, generated.text
        curl = [lines.get(timeout=5) for _ in range(3)][-1]
        assert f"curl -s {url}/v1/images/generations -H 'Authorization: Bearer {api_key.strip()}'" in curl
        # The console's address follows; the printed key signs in there (the newcomer's path without docs).
        console = ""
        while not console.strip().startswith("http"):
            console = lines.get(timeout=5)
        assert console.strip() == f"{url}/console"
        with httpx.Client(base_url=url) as browser:
            signed_in = browser.post("/console/sign-in", data={"token": api_key.strip()})
            assert signed_in.status_code == 303 and signed_in.headers["location"] == "/console/overview"
            assert browser.get("/console/playground").status_code == 200
        logged = Path(log.name).read_text()
        assert "Migrating the database..." in logged and "Built the tiny model" in logged
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
