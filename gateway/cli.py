"""The ``hidream-gateway`` command: serve, demo, worker, db, tenants, keys, usage."""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import shlex
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from gateway import launch
from gateway.api.serialize import USAGE_FIELDS, key_body, tenant_body, usage_row
from gateway.auth import create_tenant_with_key, issue_key
from gateway.errors import ConfigurationError, GatewayError
from gateway.settings import Settings
from gateway.storage import repo
from gateway.storage.db import open_database, session_factory
from gateway.terminal import (
    CliError,
    positive_int,
    print_json,
    print_table,
    quiet_stdout,
    tenant_name,
    timestamp,
    usd_amount,
)
from gateway.usage import UsageReport, month_period, report_csv, report_json, usage_report

T = TypeVar("T")
PROG = "hidream-gateway"


class EventsFormat(StrEnum):
    """How ``usage events`` prints: a table for people, JSON or CSV for programs."""

    table = "table"
    json = "json"
    csv = "csv"


class ExportFormat(StrEnum):
    """How ``usage export`` writes the invoicing report."""

    csv = "csv"
    json = "json"


Host = Annotated[str, typer.Option(metavar="HOST", help="Address to listen on (0.0.0.0: every interface).")]
Port = Annotated[int, typer.Option(min=1, max=65535, metavar="PORT", help="TCP port to listen on.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
TenantFilter = Annotated[
    str | None, typer.Option("--tenant", metavar="TENANT_ID", help="Only this tenant.", show_default="every tenant")
]


# --- shared steps --------------------------------------------------------------------------------------------


def _settings() -> Settings:
    """The settings from the environment; invalid ones stop the command with every validation error."""
    try:
        return Settings()
    except ValidationError as exc:
        raise CliError(f"invalid settings:\n{exc}") from None


def _run_db(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Migrate, then run ``work`` in one transaction; a domain error becomes a one-line message."""

    async def main() -> T:
        async with open_database(settings.resolved_database_url) as engine, session_factory(engine).begin() as session:
            return await work(session)

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(main())
    except GatewayError as exc:
        raise CliError(exc.message) from None


# --- the app -------------------------------------------------------------------------------------------------

app = typer.Typer(
    name=PROG,
    help="Serve HiDream-I1 as a paid multi-tenant image API; manage its database, tenants, keys and usage.\n\n"
    "Settings come from HDG_* environment variables (see the README).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants: who is billed, and their limits.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of tenants.", no_args_is_help=True)
usage_app = typer.Typer(help="Usage events, the invoicing export and reconciliation.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(usage_app, name="usage")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database to the latest schema (the gateway also does this when it starts)."""
    launch.migrate(_settings())
    print("database is at the latest schema revision")


@tenants_app.command("create")
def tenants_create(
    name: Annotated[
        str, typer.Argument(parser=tenant_name, metavar="NAME", help="Unique name, compared regardless of case.")
    ],
    rpm: Annotated[
        int | None, typer.Option(parser=positive_int, metavar="N", help="Requests per minute.", show_default="no limit")
    ] = None,
    monthly_budget_usd: Annotated[
        Decimal | None,
        typer.Option(
            parser=usd_amount, metavar="USD", help="Spend per UTC calendar month, in USD.", show_default="no limit"
        ),
    ] = None,
    max_in_flight: Annotated[
        int | None,
        typer.Option(parser=positive_int, metavar="N", help="Jobs queued or running at once.", show_default="no limit"),
    ] = None,
) -> None:
    """Create a tenant and its first API key; prints {"tenant_id", "key_id", "api_key"} (the key, once)."""

    async def work(session: AsyncSession) -> dict[str, Any]:
        tenant, key, plaintext = await create_tenant_with_key(
            session, name=name, rpm=rpm, monthly_budget_usd=monthly_budget_usd
        )
        tenant.max_in_flight = max_in_flight
        return {"tenant_id": tenant.id, "key_id": key.id, "api_key": plaintext}

    print_json(_run_db(_settings(), work))


@tenants_app.command("list")
def tenants_list(as_json: AsJson = False) -> None:
    """List tenants, oldest first."""

    async def work(session: AsyncSession) -> list[dict[str, Any]]:
        return [tenant_body(t) for t in await repo.list_tenants(session)]

    tenants = _run_db(_settings(), work)
    if as_json:
        print_json(tenants)
        return
    columns = ("ID", "NAME", "STATUS", "RPM", "BUDGET USD/MONTH", "MAX IN FLIGHT", "CREATED (UTC)")
    fields = ("id", "name", "status", "rpm", "monthly_budget_usd", "max_in_flight")
    print_table(columns, [[t[f] for f in fields] + [timestamp(t["created_at"])] for t in tenants])


@keys_app.command("create")
def keys_create(
    tenant_id: Annotated[str, typer.Argument(metavar="TENANT_ID", help="The tenant's id (ten_...).")],
) -> None:
    """Issue another API key for a tenant; prints {"tenant_id", "key_id", "api_key"} (the key, once)."""

    async def work(session: AsyncSession) -> dict[str, Any]:
        if await repo.get_tenant(session, tenant_id=tenant_id) is None:
            raise CliError(f"no tenant with id {tenant_id!r}")
        key, plaintext = await issue_key(session, tenant_id=tenant_id)
        return {"tenant_id": tenant_id, "key_id": key.id, "api_key": plaintext}

    print_json(_run_db(_settings(), work))


@keys_app.command("list")
def keys_list(
    tenant_id: Annotated[str, typer.Argument(metavar="TENANT_ID", help="The tenant's id (ten_...).")],
    as_json: AsJson = False,
) -> None:
    """List a tenant's API keys, revoked ones included (only their prefixes: the keys themselves are not stored)."""

    async def work(session: AsyncSession) -> list[dict[str, Any]]:
        if await repo.get_tenant(session, tenant_id=tenant_id) is None:
            raise CliError(f"no tenant with id {tenant_id!r}")
        return [key_body(k) for k in await repo.list_keys(session, tenant_id=tenant_id)]

    keys = _run_db(_settings(), work)
    if as_json:
        print_json(keys)
        return
    columns = ("ID", "PREFIX", "CREATED (UTC)", "REVOKED (UTC)", "RPM", "BUDGET USD/MONTH", "MAX IN FLIGHT")
    rows = [
        (
            k["id"],
            f"{k['display_prefix']}...",
            timestamp(k["created_at"]),
            timestamp(k["revoked_at"]),
            k["rpm"],
            k["monthly_budget_usd"],
            k["max_in_flight"],
        )
        for k in keys
    ]
    print_table(columns, rows)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="The key's id (key_...).")]) -> None:
    """Revoke an API key (at once on this host; other replicas within HDG_AUTH_CACHE_SECONDS); prints the key."""

    async def work(session: AsyncSession) -> dict[str, Any]:
        key = await repo.revoke_key(session, key_id=key_id)
        if key is None:
            raise CliError(f"no key with id {key_id!r}")
        return key_body(key)

    print_json(_run_db(_settings(), work))


@usage_app.command("events")
def usage_events(
    tenant: TenantFilter = None,
    fmt: Annotated[EventsFormat, typer.Option("--format", help="Output format.")] = EventsFormat.table,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: the same as --format json.")] = False,
) -> None:
    """List usage events (one per finished generation), oldest first."""
    if as_json and fmt is EventsFormat.csv:
        raise CliError("--json and --format csv ask for different formats: give one")

    async def work(session: AsyncSession) -> list[dict[str, Any]]:
        events = await repo.list_usage(session, tenant_id=tenant, limit=1_000_000)
        return [usage_row(e) for e in events]

    rows = _run_db(_settings(), work)
    if as_json or fmt is EventsFormat.json:
        print_json(rows)
    elif fmt is EventsFormat.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(USAGE_FIELDS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        columns = [
            "CREATED (UTC)",
            "TENANT",
            "PREDICTION",
            "MODEL",
            "SIZE",
            "IMAGES",
            "BACKEND",
            "PRICE USD",
            "COST USD",
            "MS",
            "STATUS",
        ]
        table = [
            (
                timestamp(r["created_at"]),
                r["tenant_id"],
                r["prediction_id"],
                r["model"],
                f"{r['width']}x{r['height']}",
                r["images"],
                r["backend"],
                r["price_usd"],
                r["cost_usd"],
                r["latency_ms"],
                r["status"],
            )
            for r in rows
        ]
        print_table(columns, table)


@usage_app.command("export")
def usage_export(
    period: Annotated[str, typer.Option(metavar="YYYY-MM", help="A UTC calendar month.")],
    tenant: TenantFilter = None,
    fmt: Annotated[ExportFormat, typer.Option("--format", help="Output format.")] = ExportFormat.csv,
    output: Annotated[
        Path | None, typer.Option(dir_okay=False, metavar="FILE", help="Write to this file.", show_default="stdout")
    ] = None,
) -> None:
    """The invoicing export: one month's billed usage per tenant, UTC day, model and backend."""
    try:
        window = month_period(period)
    except GatewayError as exc:
        raise CliError(exc.message) from None

    async def work(session: AsyncSession) -> UsageReport:
        if tenant is not None and await repo.get_tenant(session, tenant_id=tenant) is None:
            raise CliError(f"no tenant with id {tenant!r}")
        return await usage_report(session, period=window, tenant_id=tenant, by_tenant=True)

    report = _run_db(_settings(), work)
    text = report_csv(report) if fmt is ExportFormat.csv else json.dumps(report_json(report)) + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot write {output}: {exc.strerror}") from None
    print(f"wrote {len(report.lines)} rows for {period} to {output}", file=sys.stderr)


@usage_app.command("reconcile")
def usage_reconcile(
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="First set spend, reservations and in-flight counts to what their rows add up to "
            "(safe while serving).",
        ),
    ] = False,
) -> None:
    """Check that predictions, usage events and monthly spend agree; exit status 1 on any mismatch."""
    from gateway import reconcile as books  # imported on use: no other command needs it

    settings = _settings()
    if repair:
        try:
            changes = _run_db(settings, books.repair)
        except DBAPIError as exc:
            raise CliError(
                f"the repair could not lock the ledger (is a long transaction holding it?): {exc.orig}"
            ) from None
        for line in changes:
            print(f"repaired {line}")
    report = _run_db(settings, books.reconcile)
    for line in report.mismatches:
        print(line)
    checked = ", ".join(f"{count} {what}" for what, count in report.checked.items())
    print(f"reconcile: {len(report.mismatches)} mismatch(es); checked {checked or 'nothing'}")
    if report.mismatches:
        raise typer.Exit(1)


# --- servers -------------------------------------------------------------------------------------------------


@app.command()
def serve(
    host: Host = "127.0.0.1",
    port: Port = 8000,
    workers: Annotated[
        int, typer.Option(parser=positive_int, metavar="N", help="Processes; more than 1 only with remote backends.")
    ] = 1,
) -> None:
    """Run the gateway (migrating the database first)."""
    launch.serve(_settings(), host=host, port=port, workers=workers)


@app.command()
def worker(host: Host = "127.0.0.1", port: Port = 9000) -> None:
    """Serve the GPU worker protocol on this machine's HDG_LOCAL_MODEL (bearer token: HDG_WORKER_TOKEN)."""
    launch.run_worker(_settings(), host=host, port=port)


@app.command()
def demo(host: Host = "127.0.0.1", port: Port = 8000) -> None:
    """Create (or reuse) the demo tenant, give it a fresh key, serve; once ready print curl lines and /console."""
    settings = _settings()
    server = launch.gateway_app(settings)  # first: a misconfigured backend stops the demo before any slow step
    launch.prepare(settings)

    async def work(session: AsyncSession) -> tuple[str, str]:
        tenant = await repo.find_tenant_by_name(session, name="demo")
        if tenant is None:
            tenant, _key, plaintext = await create_tenant_with_key(session, name="demo")
        else:
            _key, plaintext = await issue_key(session, tenant_id=tenant.id)
        return tenant.id, plaintext

    tenant_id, api_key = _run_db(settings, work)
    base = settings.public_url or f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # noqa: S104
    body = json.dumps({"model": "hidream-i1-fast", "prompt": "a lighthouse on a cliff at dusk"})
    curl = (
        f"curl -s {base}/v1/images/generations -H 'Authorization: Bearer {api_key}' "
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )
    save = (
        f"{curl} | python3 -c 'import json,sys,urllib.request; "
        f'sys.stdout.buffer.write(urllib.request.urlopen(json.load(sys.stdin)["data"][0]["url"]).read())'
        "' > demo.png"
    )
    # Printed once /readyz says the model is loaded and warm, so the first curl someone pastes is served at once.
    launch.serve_app(
        server,
        host=host,
        port=port,
        when_ready=f"\nThe gateway is ready. Demo tenant {tenant_id}; API key (shown once): {api_key}\n\n"
        f"Generate an image (JSON with a signed URL):\n  {curl}\n\n"
        f"Generate and save it as demo.png:\n  {save}\n\n"
        f"Or open the console, sign in with the key, and try the Playground:\n  {base}/console\n",
    )


# --- entry points ---------------------------------------------------------------------------------------------

COMMAND = typer.main.get_command(app)


@dataclass(frozen=True)
class Invocation:
    """A parsed command line: the command's words (``"db upgrade"``) and its parameters by name."""

    command: str
    params: dict[str, Any]


def parse(argv: Sequence[str]) -> Invocation:
    """Parse ``argv`` (the words after ``hidream-gateway``) as ``main`` would, without running anything.

    Raises typer.TyperException on an unknown command or option or a bad value. Example:
    ``parse(["serve", "--port", "8000"]).params["port"] == 8000``.
    """
    words, command, ctx, path = list(argv), COMMAND, None, list[str]()
    while isinstance(command, typer.core.TyperGroup):
        ctx = typer.Context(command, info_name=path[-1] if path else PROG, parent=ctx)
        sub = command.get_command(ctx, words[0]) if words else None
        if sub is None:
            raise typer.BadParameter(f"no such command: {words[:1]}", ctx=ctx, param_hint="COMMAND")
        path.append(words.pop(0))
        command = sub
    leaf = command.make_context(path[-1], words, parent=ctx)
    return Invocation(" ".join(path), dict(leaf.params))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``hidream-gateway`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # migrations are shown as a step of their own
    try:
        code = COMMAND.main(args=argv, prog_name=PROG, standalone_mode=False)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit where it would print a traceback
    except (CliError, ConfigurationError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except typer.TyperException as exc:  # a bad command line (typer's usage errors), or no command at all
        if type(exc).__name__ == "NoArgsIsHelpError":
            raise SystemExit(2) from None  # the help is already printed
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else PROG
        print(f"{where}: {exc.format_message()} (see '{where} --help')", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        raise SystemExit(1) from None
    except BrokenPipeError:  # `hidream-gateway usage events --format csv | head -1`
        quiet_stdout()
        raise SystemExit(1) from None
    if isinstance(code, int) and code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
