"""The money rows: reservations, settlements and releases against monthly budgets, and in-flight slots.

A job of a limited tenant or key *holds* its maximum price on this month's ledger rows (tenant and key) and one
in-flight slot on each, taken with guarded updates in the transaction that creates the job; the transaction that
settles it charges what it cost and gives the hold back. Nothing here lives in process memory, so every replica
sees the same balances, and a crash between the two transactions leaves the hold on the job's row until a runner
settles it.

Lock order, the same in every transaction that touches these rows, so two of them never wait on each other:
tenant_spend, key_spend, tenants, api_keys (a hold first takes its owner's advisory lock before each ledger row:
the tenant's, then the key's; nothing else takes those).
"""

from __future__ import annotations

from decimal import Decimal
from functools import cache
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from gateway.errors import BudgetExceeded, ConcurrencyLimited
from gateway.storage.models import ApiKey, KeySpend, Tenant, TenantSpend
from gateway.storage.writer import execute

# Advisory-lock key spaces of the per-owner hold lock (tenants and keys apart, so their ids never collide).
_LOCK_SPACES = {"tenant_id": 0x68640001, "api_key_id": 0x68640002}
TENANT_SPEND = cast(Table, TenantSpend.__table__)
KEY_SPEND = cast(Table, KeySpend.__table__)
TENANTS = cast(Table, Tenant.__table__)
API_KEYS = cast(Table, ApiKey.__table__)


def _dialect(conn: Connection) -> str:
    return conn.dialect.name


def _insert_for(dialect: str) -> Any:
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


# The statements below are built once and executed with parameters: they run on every generation, and building a
# statement (and its cache key) costs several times what executing it does.


@cache
def _advisory_lock(owner: str) -> Any:
    return select(func.pg_advisory_xact_lock(_LOCK_SPACES[owner], func.hashtext(bindparam("owner_id"))))


@cache
def _open_month(table: Table, owner: str, dialect: str) -> Any:
    """Create an owner's month row at zero, unless it exists."""
    values = {owner: bindparam("owner_id"), "month": bindparam("in_month"), "spent_usd": 0, "reserved_usd": 0}
    return _insert_for(dialect)(table).values(values).on_conflict_do_nothing()


@cache
def _guarded_reserve(table: Table, owners: Table, owner: str) -> Any:
    """Add ``amount`` to the month's reservations where the budget allows (see ``_reserve_month``)."""
    c, other = table.c, table.alias("other")
    open_elsewhere = (
        select(func.coalesce(func.sum(other.c.reserved_usd), 0))
        .where(other.c[owner] == bindparam("owner_id"), other.c.month != bindparam("in_month"))
        .scalar_subquery()
    )
    # Read from the row, not the (cached) caller: a budget changed on another replica holds at once.
    budget = select(owners.c.monthly_budget_usd).where(owners.c.id == bindparam("owner_id")).scalar_subquery()
    amount = bindparam("amount", type_=c.reserved_usd.type)
    # Rounded to the column's six places: SQLite keeps these as binary floats, whose sums drift below a micro-dollar.
    total = func.round(c.spent_usd + c.reserved_usd + open_elsewhere + amount, 6)
    return (
        update(table)
        .where(c[owner] == bindparam("owner_id"), c.month == bindparam("in_month"))
        .where(or_(budget.is_(None), total <= budget))
        .values(reserved_usd=func.round(c.reserved_usd + amount, 6))
    )


@cache
def _slot(table: Table, delta: int) -> Any:
    """Take (+1, where the limit allows) or give back (-1) an in-flight slot."""
    c = table.c
    stmt = update(table).where(c.id == bindparam("row_id"))
    if delta > 0:
        stmt = stmt.where(c.max_in_flight.is_(None) | (c.in_flight < c.max_in_flight))
    return stmt.values(in_flight=c.in_flight + delta)


@cache
def _apply_stmt(table: Table, owner: str, dialect: str) -> Any:
    c = table.c
    spent = bindparam("spent", type_=c.spent_usd.type)
    reserved = bindparam("reserved", type_=c.reserved_usd.type)
    values = {owner: bindparam("owner_id"), "month": bindparam("in_month"), "spent_usd": spent}
    values["reserved_usd"] = reserved
    return (
        _insert_for(dialect)(table)
        .values(values)
        .on_conflict_do_update(
            index_elements=[owner, "month"],
            set_={
                "spent_usd": func.round(c.spent_usd + spent, 6),
                "reserved_usd": func.round(c.reserved_usd + reserved, 6),
            },
        )
    )


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0))


def _reserve_month(
    conn: Connection, table: Table, owners: Table, owner: str, owner_id: str, *, month: str, amount: Decimal
) -> bool:
    """Add ``amount`` to the month's reservations unless the owner's budget would be passed.

    The budget counts this month's spend and reservations, plus the holds still open in any other month: a job
    held in one month and ended in the next is charged to the month it ends in, so its hold must count there too
    (and a replica whose clock is a little behind may still be holding into the month before).
    """
    dialect = _dialect(conn)
    params = {"owner_id": owner_id, "in_month": month}
    if dialect == "postgresql":
        # One hold at a time per owner, whatever the month: the guard's reads of the other months then see every
        # committed hold (two holds on different month rows would not wait on each other's row lock).
        execute(conn, _advisory_lock(owner), params)
    # One guarded update: on PostgreSQL a concurrent reservation of the same row waits for this one's commit, then
    # the guard is evaluated again on the row as that commit left it, so two jobs can't both take the last dollar.
    # (The subqueries are read once, before that wait: other months' holds can only have shrunk meanwhile, since
    # holds are taken one at a time, so a stale read refuses a little early, never late.)
    reserve = _guarded_reserve(table, owners, owner)
    if _rowcount(execute(conn, reserve, params | {"amount": amount})) == 1:
        return True
    # Nothing was updated: the budget refused, or the month has no row yet (its first job). Make sure it has one and
    # ask the guard again. Again even when the insert found the row there: a settle crossing into the new month may
    # have created it since the update (settles do not take the hold lock), and the hold must then be judged on it.
    execute(conn, _open_month(table, owner, dialect), params)
    return _rowcount(execute(conn, reserve, params | {"amount": amount})) == 1


def _take_slot(conn: Connection, table: Table, row_id: str) -> bool:
    return _rowcount(execute(conn, _slot(table, +1), {"row_id": row_id})) == 1


def hold(conn: Connection, *, tenant: Tenant, key: ApiKey, month: str, amount: Decimal) -> None:
    """Reserve ``amount`` on the tenant's and the key's month, and take one in-flight slot of each, or refuse.

    Raises BudgetExceeded (402) or ConcurrencyLimited (429); the caller's transaction must then roll back, which
    undoes whatever part of the hold was taken.
    """
    if not _reserve_month(conn, TENANT_SPEND, TENANTS, "tenant_id", tenant.id, month=month, amount=amount):
        raise BudgetExceeded(
            f"This request would cost up to ${amount}, more than is left of the tenant's monthly budget of "
            f"${tenant.monthly_budget_usd} ({month}, counting jobs still running)."
        )
    if not _reserve_month(conn, KEY_SPEND, API_KEYS, "api_key_id", key.id, month=month, amount=amount):
        raise BudgetExceeded(
            f"This request would cost up to ${amount}, more than is left of this API key's monthly budget of "
            f"${key.monthly_budget_usd} ({month}, counting jobs still running)."
        )
    if not _take_slot(conn, TENANTS, tenant.id):
        raise ConcurrencyLimited(
            f"The tenant already has {tenant.max_in_flight} jobs queued or running; retry when one finishes.",
            headers={"Retry-After": "1"},
        )
    if not _take_slot(conn, API_KEYS, key.id):
        raise ConcurrencyLimited(
            f"This API key already has {key.max_in_flight} jobs queued or running; retry when one finishes.",
            headers={"Retry-After": "1"},
        )


def _apply(
    conn: Connection, table: Table, owner: dict[str, str], *, month: str, spent: Decimal, reserved: Decimal
) -> None:
    ((column, owner_id),) = owner.items()
    stmt = _apply_stmt(table, column, _dialect(conn))
    execute(conn, stmt, {"owner_id": owner_id, "in_month": month, "spent": spent, "reserved": reserved})


def settle(
    conn: Connection,
    *,
    tenant_id: str,
    key_id: str,
    month: str,
    charge: Decimal,
    held: Decimal | None,
    held_month: str | None,
) -> None:
    """Charge ``charge`` to ``month`` and give back a job's hold (``held`` in ``held_month``, and its slots)."""
    for table, owner in ((TENANT_SPEND, {"tenant_id": tenant_id}), (KEY_SPEND, {"api_key_id": key_id})):
        if held is not None and held_month is not None and held_month != month:
            if charge:
                _apply(conn, table, owner, month=month, spent=charge, reserved=Decimal(0))
            _apply(conn, table, owner, month=held_month, spent=Decimal(0), reserved=-held)
        elif charge or held:
            _apply(conn, table, owner, month=month, spent=charge, reserved=-(held or Decimal(0)))
    if held is not None:
        for table, row_id in ((TENANTS, tenant_id), (API_KEYS, key_id)):
            execute(conn, _slot(table, -1), {"row_id": row_id})
