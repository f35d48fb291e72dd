"""The ``hidream-gateway`` command: serve, demo, db, tenants, keys, usage."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import shlex
import sys
from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.api.serialize import USAGE_FIELDS, key_body, tenant_body, usage_row
from gateway.auth import create_tenant_with_key, issue_key
from gateway.errors import InvalidRequest
from gateway.settings import Settings
from gateway.storage import repo
from gateway.storage.db import open_database, session_factory
from gateway.usage import UsageReport, month_period, report_csv, report_json, usage_report

T = TypeVar("T")


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _run_db(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Migrate, then run ``work`` in one transaction."""

    async def main() -> T:
        async with open_database(settings.resolved_database_url) as engine, session_factory(engine).begin() as session:
            return await work(session)

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(main())


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=None))


def _budget(value: str) -> Decimal:
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if amount < 0 or not amount.is_finite():
        raise argparse.ArgumentTypeError("must be a non-negative amount in USD")
    return amount


def _name(value: str) -> str:
    if not value or "\x00" in value or len(value) > 200:
        raise argparse.ArgumentTypeError("must be 1 to 200 characters, without NUL")
    return value


def _positive(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 2**31 - 1:  # limits are 32-bit columns
        raise argparse.ArgumentTypeError("must be a positive integer below 2^31")
    return int(value)


def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> None:
    async def main() -> None:
        async with open_database(settings.resolved_database_url):
            pass

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(main())
    print("database is at the latest schema revision")


def cmd_tenants_create(settings: Settings, args: argparse.Namespace) -> None:
    async def work(session: AsyncSession) -> dict[str, Any]:
        tenant, key, plaintext = await create_tenant_with_key(
            session, name=args.name, rpm=args.rpm, monthly_budget_usd=args.monthly_budget_usd
        )
        tenant.max_in_flight = args.max_in_flight
        return {"tenant_id": tenant.id, "key_id": key.id, "api_key": plaintext}

    _print_json(_run_db(settings, work))


def cmd_tenants_list(settings: Settings, args: argparse.Namespace) -> None:
    async def work(session: AsyncSession) -> list[dict[str, Any]]:
        return [tenant_body(t) for t in await repo.list_tenants(session)]

    _print_json(_run_db(settings, work))


def cmd_keys_create(settings: Settings, args: argparse.Namespace) -> None:
    async def work(session: AsyncSession) -> dict[str, Any]:
        if await repo.get_tenant(session, tenant_id=args.tenant_id) is None:
            raise CliError(f"no tenant with id {args.tenant_id!r}")
        key, plaintext = await issue_key(session, tenant_id=args.tenant_id)
        return {"tenant_id": args.tenant_id, "key_id": key.id, "api_key": plaintext}

    _print_json(_run_db(settings, work))


def cmd_keys_revoke(settings: Settings, args: argparse.Namespace) -> None:
    async def work(session: AsyncSession) -> dict[str, Any]:
        key = await repo.revoke_key(session, key_id=args.key_id)
        if key is None:
            raise CliError(f"no key with id {args.key_id!r}")
        return key_body(key)

    _print_json(_run_db(settings, work))


def cmd_usage_events(settings: Settings, args: argparse.Namespace) -> None:
    async def work(session: AsyncSession) -> list[dict[str, Any]]:
        events = await repo.list_usage(session, tenant_id=args.tenant, limit=1_000_000)
        return [usage_row(e) for e in events]

    rows = _run_db(settings, work)
    if args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(USAGE_FIELDS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        _print_json(rows)


def cmd_usage_export(settings: Settings, args: argparse.Namespace) -> None:
    """The invoicing export: one month's billed usage per tenant, UTC day, model and backend."""
    try:
        period = month_period(args.period)
    except InvalidRequest as exc:
        raise CliError(exc.message) from None

    async def work(session: AsyncSession) -> UsageReport:
        if args.tenant is not None and await repo.get_tenant(session, tenant_id=args.tenant) is None:
            raise CliError(f"no tenant with id {args.tenant!r}")
        return await usage_report(session, period=period, tenant_id=args.tenant, by_tenant=True)

    report = _run_db(settings, work)
    text = report_csv(report) if args.format == "csv" else json.dumps(report_json(report)) + "\n"
    if args.output is None:
        sys.stdout.write(text)
        return
    try:
        args.output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot write {args.output}: {exc.strerror}") from None
    print(f"wrote {len(report.lines)} rows for {args.period} to {args.output}", file=sys.stderr)


def cmd_usage_reconcile(settings: Settings, args: argparse.Namespace) -> None:
    """Check that predictions, usage events and monthly spend agree; exit status 1 on any mismatch."""
    from gateway.reconcile import reconcile, repair  # imported on use: no other command needs it

    if args.repair:
        try:
            changes = _run_db(settings, repair)
        except DBAPIError as exc:
            raise CliError(
                f"the repair could not lock the ledger (is a long transaction holding it?): {exc.orig}"
            ) from None
        for line in changes:
            print(f"repaired {line}")
    report = _run_db(settings, reconcile)
    for line in report.mismatches:
        print(line)
    checked = ", ".join(f"{count} {what}" for what, count in report.checked.items())
    print(f"reconcile: {len(report.mismatches)} mismatch(es); checked {checked or 'nothing'}")
    if report.mismatches:
        raise SystemExit(1)


def _serve(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    from gateway.app import create_app

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", proxy_headers=True)


# In the metrics directory of `serve --workers N`: locked while a gateway serves with that directory.
SERVING_LOCK = ".serving.lock"


def cmd_serve(settings: Settings, args: argparse.Namespace) -> None:
    if args.workers == 1:
        _serve(settings, args.host, args.port)
        return
    if "local" in settings.backends:
        raise CliError("--workers > 1 would load the local model once per process: serve it with one worker")
    import fcntl
    import os

    import uvicorn

    from gateway.metrics import MULTIPROC_ENV

    # Metrics: each worker writes its values to files in one directory and /metrics, in whichever worker answers,
    # adds them all up. One per port, so two gateways sharing a data dir keep apart. A directory given in the
    # environment is the operator's to manage.
    given = os.environ.get(MULTIPROC_ENV)
    directory = Path(given) if given else settings.data_dir.resolve() / "prometheus" / f"port-{args.port}"
    directory.mkdir(parents=True, exist_ok=True)
    # Held by this process (the one that spawns the workers) until it exits, and taken before anything is deleted:
    # a second `serve` started by mistake must not empty the files the running workers write to (they would go on
    # writing to deleted files and /metrics would stay blank until a restart). The kernel drops it on any exit.
    with (directory / SERVING_LOCK).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            where = (
                f"{MULTIPROC_ENV}={directory}" if given else f"this data dir ({settings.data_dir}) on port {args.port}"
            )
            raise CliError(f"another gateway is serving with {where}") from None
        if not given:
            _empty_metrics_dir(directory)
        # Set before the workers start: prometheus-client picks its storage when first imported.
        os.environ[MULTIPROC_ENV] = str(directory)
        cmd_db_upgrade(settings, args)  # once, before the processes start
        # Each process builds its own app from the same environment (clients, pools, caches are per process).
        uvicorn.run(
            "gateway.app:app_from_env",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level="info",
            proxy_headers=True,
        )


def _empty_metrics_dir(directory: Path) -> None:
    """Delete a previous run's metric files (they would add its counts to this run's), keeping the lock file."""
    import shutil

    for entry in directory.iterdir():
        if entry.name == SERVING_LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)


def cmd_worker(settings: Settings, args: argparse.Namespace) -> None:
    """Serve the self-hosted worker protocol on this machine's GPU (or CPU, on the tiny model)."""
    import uvicorn

    from inference.serving import GenerationQueue, model_loader
    from inference.worker import create_worker_app

    loader = model_loader(
        settings.local_model,
        cache_dir=settings.models_dir,
        llama_path=settings.local_llama_path,
        device=settings.local_device,
    )
    token = settings.worker_token.get_secret_value() if settings.worker_token else None
    if token is None:
        logging.getLogger("hidream_gateway").warning("HDG_WORKER_TOKEN is not set: the worker accepts anyone")
    app = create_worker_app(
        GenerationQueue(loader, queue_size=settings.local_queue_size),
        token=token,
        variants=frozenset(settings.local_variants),
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def cmd_demo(settings: Settings, args: argparse.Namespace) -> None:
    """Create (or reuse) the demo tenant, give it a fresh key, print how to call it, then serve."""

    async def work(session: AsyncSession) -> tuple[str, str]:
        tenant = await repo.find_tenant_by_name(session, name="demo")
        if tenant is None:
            tenant, _key, plaintext = await create_tenant_with_key(session, name="demo")
        else:
            _key, plaintext = await issue_key(session, tenant_id=tenant.id)
        return tenant.id, plaintext

    tenant_id, api_key = _run_db(settings, work)
    base = settings.public_url or f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"  # noqa: S104
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
    print(
        f"\nDemo tenant {tenant_id}; API key (shown once): {api_key}\n\n"
        f"Generate an image (JSON with a signed URL):\n  {curl}\n\n"
        f"Generate and save it as demo.png:\n  {save}\n",
        flush=True,
    )
    _serve(settings, args.host, args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hidream-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=_positive, default=1, help="processes (remote backends only)")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="create a demo tenant and key, print a curl line, and serve")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    demo.set_defaults(func=cmd_demo)

    worker = sub.add_parser("worker", help="serve the GPU worker protocol (HDG_LOCAL_MODEL, HDG_WORKER_TOKEN)")
    worker.add_argument("--host", default="127.0.0.1")
    worker.add_argument("--port", type=int, default=9000)
    worker.set_defaults(func=cmd_worker)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="migrate to the latest schema").set_defaults(func=cmd_db_upgrade)

    tenants = sub.add_parser("tenants", help="manage tenants").add_subparsers(dest="tenants_command", required=True)
    create = tenants.add_parser("create", help="create a tenant and its first API key")
    create.add_argument("name", type=_name)
    create.add_argument("--rpm", type=_positive, default=None, help="requests per minute limit")
    create.add_argument("--monthly-budget-usd", type=_budget, default=None)
    create.add_argument("--max-in-flight", type=_positive, default=None, help="jobs queued or running at once")
    create.set_defaults(func=cmd_tenants_create)
    tenants.add_parser("list", help="list tenants").set_defaults(func=cmd_tenants_list)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    kcreate = keys.add_parser("create", help="create another key for a tenant")
    kcreate.add_argument("tenant_id")
    kcreate.set_defaults(func=cmd_keys_create)
    krevoke = keys.add_parser("revoke", help="revoke a key")
    krevoke.add_argument("key_id")
    krevoke.set_defaults(func=cmd_keys_revoke)

    usage = sub.add_parser("usage", help="usage events, invoicing export, reconciliation")
    usage_sub = usage.add_subparsers(dest="usage_command", required=True)
    events = usage_sub.add_parser("events", help="list usage events")
    events.add_argument("--tenant", default=None)
    events.add_argument("--format", choices=["json", "csv"], default="json")
    events.set_defaults(func=cmd_usage_events)
    export = usage_sub.add_parser("export", help="billed usage of a month per tenant, UTC day, model and backend")
    export.add_argument("--period", required=True, help="a UTC calendar month, YYYY-MM")
    export.add_argument("--tenant", default=None)
    export.add_argument("--format", choices=["csv", "json"], default="csv")
    export.add_argument("--output", type=Path, default=None, help="write to this file instead of stdout")
    export.set_defaults(func=cmd_usage_export)
    reconcile = usage_sub.add_parser("reconcile", help="check predictions, usage events and spend agree")
    reconcile.add_argument(
        "--repair",
        action="store_true",
        help="first set spend, reservations and in-flight counts to what their rows add up to (safe while serving)",
    )
    reconcile.set_defaults(func=cmd_usage_reconcile)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``hidream-gateway`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command not in ("serve", "demo", "worker"):
        logging.getLogger("alembic").setLevel(logging.WARNING)  # keep one-shot commands' output clean
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"hidream-gateway: invalid settings:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        args.func(settings, args)
    except CliError as exc:
        print(f"hidream-gateway: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
