"""tenant-safe errors: rows written before tenants saw fixed phrases lose the backends' words from tenants' views

Before 14da15f an attempt's ``message`` in ``predictions.attempt_log`` was the backend's own words (a provider's
error body, another system's internals), the job's ``error`` quoted them, and so did its ``logs`` (``fal failed:
<words>``); rows from before 0005 have no attempt list but the same ``error`` and ``logs``. Each such row is rewritten
once, in batches: each attempt's words move to its admin-only ``detail`` (credentials redacted, 500 characters at
most) and its ``message`` becomes the fixed phrase; ``error`` is rebuilt from those phrases as the runner builds it
now (or, with no attempt list, becomes a fixed sentence per error code); a ``failed:`` log line gets the phrase.

Self-contained on purpose: the phrase table and the credential pattern are copies of gateway/errors.py as of this
revision, so later changes there cannot change what this migration did.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

BATCH = 500
DETAIL_CHARS = 500

_VALUE = r"[^\s\"'`,;&<>()\[\]{}]"
_SECRET = (
    rf"(?:(?={_VALUE}{{0,256}}[a-z])(?={_VALUE}{{0,256}}\d){_VALUE}{{12,}} | [\w.-]+:[\w-]{{12,}} | [\w.~+/=-]{{24,}})"
)
_QUOTED = r"""["']?\s*[:=]?\s*["']?"""
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"
_HASHES = r"(?:sha\d*|sha3-\d+|md5|blake2[bs]|blake3|crc32c?|xxh\d*)"
_ID_FIELDS = r"(?:request|trace|span|correlation|prediction|job|run|task|event|version|model|build|commit)[_-]?id"
# What follows a bare ``key`` and names something rather than being a secret: a path from a root (``/``, ``./``,
# ``../``, ``~/``), a file name (a lower-case extension), a dotted name of short parts (a weight in a checkpoint; a
# JWT's parts are longer) or a lower-case snake_case identifier (mixed case is a secret's shape: ``sk_live_4eC3...``).
_NAMED = (
    rf"(?:\.{{0,2}}/|~/)"
    rf"|[\w-]{{1,128}}(?-i:\.[a-z][a-z0-9]{{1,11}})(?!{_VALUE})"
    rf"|(?:[\w-]{{1,24}}\.)+[\w-]{{1,24}}(?!{_VALUE})"
    rf"|(?-i:[a-z0-9]++(?:_[a-z0-9]++)++)(?![\w:-])"
)
CREDENTIALS = re.compile(
    rf"""(?ix)
    (?<![\w+.-])(?P<url>[a-z][a-z0-9+.-]*+://)[^\s/?\#]+@
    | (?P<lead>\b(?:bearer|basic|authorization|(?:\w+[_-])?(?:api[_-]?key|token|secret|password|passwd)|\w+[_-]key)\b
        {_QUOTED}){_SECRET}
    | (?P<keylead>\bkey\b{_QUOTED})(?!{_NAMED}){_SECRET}
    | \b(?:r8_[\w-]{{8,}} | w[ks]-\w{{8,}} | sk-[\w-]{{16,}} | hdg_[\w-]{{32,}} | whsec_[\w+/=]{{16,}})
    | (?<![\w-])(?!{_ID_FIELDS}:)(?!{_HASHES}:)[\w-]{{6,}}+:(?!{_UUID})(?![0-9a-f]{{40,}}\b)
      (?=[\w-]*\d)(?=[\w-]*[a-z])[\w-]{{12,}}\b
    """
)

PHRASES = {
    "unauthorized": "its credentials were refused",
    "unreachable": "the connection failed",
    "timeout": "the backend timed out",
    "busy": "the backend is at capacity",
    "unavailable": "the backend is not ready",
    "invalid_input": "the backend rejected the input",
    "failed": "the backend failed",
}
# A failed job with no attempt list: what its error code means, in words that quote nothing.
SENTENCES = {
    "backend_error": "A backend failed; the prediction failed.",
    "timeout": "No backend finished in time.",
    "backend_busy": "Every backend that could serve this request was at capacity; retry later.",
    "backend_unavailable": "No backend could serve this request.",
    "invalid_value": "A backend rejected the input.",
    "storage_unavailable": "The image could not be stored.",
}
GENERIC = "The prediction failed."
KEPT = {"abandoned: the gateway stopped"}  # the gateway's own words (migration 0003), quoting nobody
ENDED = ("succeeded", "canceled", "running")
LINE = re.compile(r"^(?P<backend>[\w.-]+) failed: ")
OURS = re.compile(r"^(?:Attempt \d+ on |Re-attached to the job on |Succeeded on |Canceled)")

predictions = sa.table(
    "predictions",
    sa.column("id", sa.String),
    sa.column("status", sa.String),
    sa.column("error", sa.Text),
    sa.column("error_code", sa.String),
    sa.column("logs", sa.Text),
    sa.column("attempt_log", sa.JSON),
)


def redact(text: str) -> str:
    def hide(match: re.Match[str]) -> str:
        if match.group("url"):
            return f"{match.group('url')}***@"
        return f"{match.group('lead') or match.group('keylead') or ''}***"

    return CREDENTIALS.sub(hide, text)


def phrase(outcome: str, status: int | None) -> str:
    words = PHRASES.get(outcome, PHRASES["failed"])
    if outcome == "unauthorized" and status is not None:
        return f"the backend answered {status}: {words}"
    if outcome == "failed" and status is not None:
        return f"the backend answered {status}" if status >= 400 else "the backend's answer was unusable"
    return words


def _status(entry: dict[str, Any]) -> int | None:
    status = entry.get("status")
    return status if isinstance(status, int) else None


def _error(row: Any, entries: list[dict[str, Any]], raw: list[str | None]) -> str | None:
    """The failed job's error as the runner words it now, from the first attempt whose words the old one quoted."""
    old: str | None = row.error
    if row.status != "failed" or old is None:
        return old
    if old in KEPT:
        return old
    failed = [(e, words) for e, words in zip(entries, raw, strict=True) if words and e.get("outcome") not in ENDED]
    cause = next(((e, words) for e, words in failed if words in old or words.rstrip(".") in old), None)
    if cause is None:
        return SENTENCES.get(row.error_code or "", GENERIC)
    entry = cause[0]
    backend, outcome, status = entry.get("backend"), str(entry.get("outcome")), _status(entry)
    if outcome == "invalid_input":
        return f"{backend} rejected the input ({status})." if status is not None else f"{backend} rejected the input."
    said = f"{backend}: {phrase(outcome, status)}"
    if old.startswith("No backend finished in time."):
        return f"No backend finished in time. The first failure: {said}."
    if len(entries) <= 1:
        return f"{said}."
    return f"{said}. None of the {len(entries)} attempts succeeded; each is listed in attempts."


def _logs(logs: str, entries: list[dict[str, Any]]) -> str:
    """Each ``<backend> failed: <words>`` line as ``<backend> failed: <phrase>.``; the words' further lines go."""
    phrases: dict[str, list[str]] = {}
    for e in entries:
        if e.get("outcome") not in ENDED:
            phrases.setdefault(str(e.get("backend")), []).append(phrase(str(e.get("outcome")), _status(e)))
    kept: list[str] = []
    quoting = False
    for line in logs.split("\n"):
        failed = LINE.match(line)
        if failed:
            backend = failed.group("backend")
            said = phrases[backend].pop(0) if phrases.get(backend) else PHRASES["failed"]
            kept.append(f"{backend} failed: {said}.")
            quoting = True
        elif quoting and line and not OURS.match(line):
            continue  # the rest of a multi-line quote
        else:
            kept.append(line)
            quoting = False
    return "\n".join(kept)


def rewrite(row: Any) -> dict[str, Any] | None:
    """The new values of a row's ``error``, ``logs`` and ``attempt_log``; None if it needs no change."""
    log = row.attempt_log
    listed = isinstance(log, list)
    if listed and all(isinstance(e, dict) and "detail" in e for e in log):
        return None  # written since tenants see fixed phrases
    # A log that is not a list (nothing this code wrote) is read as no attempts: the error still gets its sentence.
    entries: list[dict[str, Any]] = [dict(e) for e in log if isinstance(e, dict)] if listed else []
    raw: list[str | None] = []
    for entry in entries:
        words = entry.get("message")
        raw.append(words if isinstance(words, str) else None)
        if isinstance(words, str) and entry.get("outcome") not in ENDED:
            entry["detail"] = redact(words)[:DETAIL_CHARS]
            entry["message"] = phrase(str(entry.get("outcome")), _status(entry))
        else:
            entry.setdefault("detail", None)
    if not listed:
        error = row.error if row.status != "failed" or row.error in KEPT or row.error is None else None
        if row.status == "failed" and error is None and row.error is not None:
            error = SENTENCES.get(row.error_code or "", GENERIC)
    else:
        error = _error(row, entries, raw)
    values: dict[str, Any] = {"error": error, "logs": _logs(row.logs or "", entries)}
    if listed:  # (anything else stays as it is: an absent list stays SQL NULL)
        values["attempt_log"] = entries
    if values == {"error": row.error, "logs": row.logs or ""} | ({"attempt_log": log} if listed else {}):
        return None
    return values


def upgrade() -> None:
    conn = op.get_bind()
    # Only ended jobs can hold the old words; a quick text filter skips rows already in the new shape.
    text_log = sa.cast(predictions.c.attempt_log, sa.Text)
    wanted = sa.and_(
        predictions.c.status.in_(("succeeded", "failed", "canceled")),
        sa.or_(
            sa.and_(
                predictions.c.attempt_log.is_(None),
                sa.or_(predictions.c.status == "failed", predictions.c.logs.like("% failed: %")),
            ),
            sa.and_(predictions.c.attempt_log.is_not(None), sa.not_(text_log.like('%"detail"%'))),
        ),
    )
    after = ""
    while True:
        rows = conn.execute(
            sa.select(predictions).where(wanted, predictions.c.id > after).order_by(predictions.c.id).limit(BATCH)
        ).all()
        if not rows:
            break
        # One executemany per batch and shape (with or without a new attempt list), not a round trip per row.
        changes: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        for row in rows:
            values = rewrite(row)
            if values is not None:
                changes["attempt_log" in values].append({"row_id": row.id, **values})
        for with_log, params in changes.items():
            if params:
                columns = ("error", "logs", "attempt_log") if with_log else ("error", "logs")
                statement = (
                    sa.update(predictions)
                    .where(predictions.c.id == sa.bindparam("row_id"))
                    .values({c: sa.bindparam(c) for c in columns})
                )
                conn.execute(statement, params)
        after = rows[-1].id


def downgrade() -> None:
    """Nothing to undo: the backends' words were never the tenants' to read, and admins keep them in ``detail``."""
