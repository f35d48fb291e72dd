"""What the ``hidream-gateway`` command reads and prints: argument types, errors, JSON, tables, progress."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text


class CliError(Exception):
    """A user-facing error: printed on one line without a traceback, exit status 2."""


INT32 = 2**31 - 1  # limits are 32-bit columns


def positive_int(value: str) -> int:
    """A limit: a whole number from 1 to 2^31 - 1 (the columns are 32-bit)."""
    text = str(value)  # a default arrives as an int
    if not text.isdigit() or not 1 <= int(text) <= INT32:
        raise typer.BadParameter("must be a positive integer below 2^31")
    return int(text)


def usd_amount(value: str) -> Decimal:
    """An amount of money in USD: a non-negative decimal, kept exact."""
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise typer.BadParameter(f"not a number: {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise typer.BadParameter("must be a non-negative amount in USD")
    return amount


def tenant_name(value: str) -> str:
    """A tenant's name: 1 to 200 characters, no NUL (PostgreSQL cannot store it)."""
    if not value or "\x00" in value or len(value) > 200:
        raise typer.BadParameter("must be 1 to 200 characters, without NUL")
    return value


@contextmanager
def step(doing: str, done: str | None = None) -> Iterator[None]:
    """A spinner with ``doing`` on stderr while a long step runs; then ``done``, with the seconds it took.

    Example: ``with step("Migrating the database...", "Database schema is up to date"): migrate()``.
    """
    console = Console(stderr=True, highlight=False)
    started = time.monotonic()
    if console.is_terminal:
        with console.status(Text(doing)):
            yield
    else:
        console.print(Text(doing))  # logs and pipes get the line, without the animation
        yield
    if done is not None:
        console.print(Text(f"{done} ({time.monotonic() - started:.1f} s)"))


def print_json(obj: Any) -> None:
    """One JSON document on one line of stdout."""
    print(json.dumps(obj))


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Records as a table on stdout; cells are plain text (a tenant's name is never read as markup)."""
    table = Table(*columns, box=box.SIMPLE_HEAD, show_edge=False, header_style="bold", pad_edge=False)
    for row in rows:
        table.add_row(*(Text("-" if value is None else str(value)) for value in row))
    console = Console(highlight=False)
    if not console.is_terminal:
        # Piped or redirected: as wide as the table needs, so no cell is wrapped or cut to the default 80 columns.
        console.width = console.measure(table, options=console.options.update_width(1_000_000)).maximum
    console.print(table)


def timestamp(iso: str | None) -> str | None:
    """An ISO timestamp to the second, for tables (JSON keeps it whole)."""
    return None if iso is None else iso[:19].replace("T", " ")


def quiet_stdout() -> None:
    """Point stdout at /dev/null once its reader has gone, so the interpreter's last flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
