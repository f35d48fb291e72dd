"""What every HTTP backend shares: translating vendor answers into gateway errors, once, and the provider job cycle."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx
from PIL import Image

from gateway.backends.base import BackendInputError, ImageJob, ImageResult, ProviderBackend
from gateway.errors import (
    BackendBusy,
    BackendFailed,
    BackendUnauthorized,
    BackendUnreachable,
    GenerationTimeout,
    redact_credentials,
)

log = logging.getLogger("hidream_gateway.backends")
T = TypeVar("T")

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def retry_after(resp: httpx.Response, default: int = 5) -> int:
    """Seconds from a Retry-After header (either form), else ``default``."""
    value = resp.headers.get("retry-after", "")
    if value.strip().isdigit():
        return max(1, int(value))
    try:
        delta = parsedate_to_datetime(value).timestamp() - parsedate_to_datetime(resp.headers["date"]).timestamp()
        return max(1, int(delta))
    except (KeyError, TypeError, ValueError):
        return default


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("title") or body.get("error") or body
        return json.dumps(detail)[:500] if not isinstance(detail, str) else detail[:500]
    return str(body)[:300]


INPUT_DETAIL_CHARS = 200


def input_detail(resp: httpx.Response) -> str:
    """What a provider said was wrong with the input, fit for the tenant: one line of at most 200 characters.

    Only a JSON answer's own words: its ``detail``, ``title``, ``error`` or ``message`` string (or ``error``'s
    ``message``, as OpenAI-style bodies nest it), or a validation error list as ``field: message; ...``. Anything
    else (an HTML page from a proxy or load balancer in between, a bare string, other JSON) is "" and the caller says
    only who rejected the input. Whitespace is collapsed and credentials redacted (before the cut, so a cut cannot
    leave half a secret the redaction no longer recognises).
    """
    try:
        body: Any = resp.json()
    except ValueError:
        return ""
    text = ""
    if isinstance(body, dict):
        for name in ("detail", "title", "error", "message"):
            value = body.get(name)
            if isinstance(value, dict):
                value = value.get("message")
            if isinstance(value, list):
                value = "; ".join(p for item in value[:10] if (p := _problem(item)))
            if isinstance(value, str) and value.strip():
                text = value
                break
    elif isinstance(body, list):  # a bare validation error list
        text = "; ".join(p for item in body[:10] if (p := _problem(item)))
    text = redact_credentials(" ".join(text[:2000].split()))
    return text if len(text) <= INPUT_DETAIL_CHARS else text[: INPUT_DETAIL_CHARS - 1].rstrip() + "…"


def _problem(item: Any) -> str:
    """One entry of a validation error list (``{"loc": [...], "msg": ...}``) as ``field: message``."""
    if isinstance(item, str):
        return item
    if not isinstance(item, dict) or not isinstance(item.get("msg"), str):
        return ""  # not a validation entry: its JSON is no words of the provider's to show
    loc = [str(part) for part in item.get("loc") or () if part != "body"]
    return f"{'.'.join(loc)}: {item['msg']}" if loc else item["msg"]


def check(resp: httpx.Response, backend: str) -> dict[str, Any]:
    """The JSON object of a successful answer, or the gateway error the answer means.

    422/400 are the input's fault (returned to the client, never retried elsewhere); 429 and 503 mean
    "not now" (BackendBusy, with Retry-After); 401/403 mean our credentials are wrong (BackendUnauthorized);
    anything else, or a body that is not a JSON object, is a backend failure. Each carries the status.
    """
    status = resp.status_code
    if status in (400, 422):
        detail = input_detail(resp)
        said = f"{backend} rejected the input: {detail}" if detail else f"{backend} rejected the input ({status})."
        raise BackendInputError(said, upstream_status=status)
    if status == 429 or (status == 503 and "retry-after" in resp.headers):
        raise BackendBusy(f"{backend} is throttling or busy.", retry_after=retry_after(resp), upstream_status=status)
    if status in (401, 403):
        raise BackendUnauthorized(f"{backend} rejected the gateway's credentials ({status}).", upstream_status=status)
    if status >= 400:
        raise BackendFailed(f"{backend} answered {status}: {_detail(resp)}", upstream_status=status)
    try:
        body = resp.json()
    except ValueError:
        not_json = f"{backend} answered {status} with a body that is not JSON."
        raise BackendFailed(not_json, upstream_status=status) from None
    if not isinstance(body, dict):
        raise BackendFailed(f"{backend} answered {status} with JSON that is not an object.", upstream_status=status)
    return body


async def send(
    client: httpx.AsyncClient, backend: str, method: str, url: str, *, submits: bool = False, **kwargs: Any
) -> dict[str, Any]:
    """One request, translated by ``check``; transport errors become BackendUnreachable/BackendFailed.

    ``submits`` marks the call that carries the job's input: only there is a 400/422 the input's fault.
    Elsewhere (polls, results, cancels) it means the provider changed under us, so it fails over.
    """
    try:
        try:
            resp = await client.request(method, url, **kwargs)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            if method != "GET":
                raise
            # A kept-alive connection the provider closed as we reused it: a read is safe to send once more, and
            # failing a job the provider has finished (and billed) over it would waste the work.
            resp = await client.request(method, url, **kwargs)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # before TimeoutException: it never answered at all
        raise BackendUnreachable(f"{backend} cannot be reached ({type(exc).__name__}).") from exc
    except httpx.TimeoutException as exc:
        raise GenerationTimeout(f"{backend} did not answer in time ({type(exc).__name__}).") from exc
    except httpx.TransportError as exc:  # the connection dropped mid-answer, or the request could not be sent
        raise BackendUnreachable(f"{backend} dropped the connection ({type(exc).__name__}).") from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # bad encoding, redirects, a URL it gave us
        raise BackendFailed(f"{backend} gave an unusable answer ({type(exc).__name__}).") from exc
    try:
        return check(resp, backend)
    except BackendInputError as exc:
        if submits:
            raise
        raise BackendFailed(exc.message, upstream_status=exc.upstream_status) from exc


def field(body: dict[str, Any], key: str, kind: type[T], backend: str) -> T:
    """``body[key]`` if it has the expected type; a malformed answer otherwise."""
    value = body.get(key)
    if not isinstance(value, kind):
        raise BackendFailed(f"{backend} answered without a valid '{key}'.")
    return value


@dataclass
class Decoded:
    images: list[bytes]
    content_type: str
    width: int
    height: int


def normalise(blobs: list[bytes], output_format: str, quality: int, backend: str) -> Decoded:
    """Check every blob is an image and re-encode any not already in ``output_format`` (blocking)."""
    images: list[bytes] = []
    size = (0, 0)
    for blob in blobs:
        try:
            img = Image.open(io.BytesIO(blob))
            size = img.size
            if img.format == PIL_FORMATS[output_format]:
                if img.format == "PNG":
                    # Every chunk's checksum and the end of the file, without inflating the pixels: a 1024x1024
                    # PNG is checked in a fraction of a millisecond, where decoding it takes several.
                    img.verify()
                else:
                    img.load()
                images.append(blob)
                continue
            img.load()
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format=PIL_FORMATS[output_format], quality=quality)
            images.append(buf.getvalue())
        except Exception as exc:  # not an image, a decompression bomb, a mode we cannot encode
            raise BackendFailed(f"{backend} returned an output that is not a usable image.") from exc
    return Decoded(images, CONTENT_TYPES[output_format], size[0], size[1])


INLINE_DECODE_PIXELS = 256 * 256
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _cheap(blob: bytes, output_format: str) -> int:
    """The pixels ``normalise`` will decode, from the image's header: none for a PNG kept as it is (it is verified,
    not decoded), 0 for what is not an image (normalise says what is wrong with it)."""
    if output_format == "png" and blob.startswith(PNG_SIGNATURE):  # a PNG is one by its signature
        return 0  # without opening it: normalise reads its header anyway
    try:
        width, height = Image.open(io.BytesIO(blob)).size
    except Exception:
        return 0
    return int(width * height)


async def decode(blobs: list[bytes], output_format: str, quality: int, backend: str) -> Decoded:
    """``normalise`` off the event loop, except when little is decoded, where a thread hop costs more.

    Counted in pixels, not bytes: a flat 1024x1024 PNG is a few kilobytes, and decoding it takes milliseconds.
    """
    if sum(_cheap(b, output_format) for b in blobs) <= INLINE_DECODE_PIXELS:
        return normalise(blobs, output_format, quality, backend)
    return await asyncio.to_thread(normalise, blobs, output_format, quality, backend)


async def gather_all(*work: Awaitable[T]) -> list[T]:
    """Run all of ``work`` at once; if one fails, cancel the rest (they may be billing) and raise its error."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks: list[asyncio.Task[T]] = [group.create_task(w) for w in work]  # type: ignore[arg-type]
    except BaseExceptionGroup as grouped:
        raise grouped.exceptions[0] from None
    return [t.result() for t in tasks]


async def with_deadline(work: Awaitable[T], *, timeout: float, backend: str) -> T:
    """Await ``work`` for at most ``timeout`` seconds; past that, GenerationTimeout."""
    try:
        async with asyncio.timeout(timeout):
            return await work
    except TimeoutError as exc:
        raise GenerationTimeout(f"{backend} did not finish within {timeout:.0f} s.") from exc


async def best_effort(work: Awaitable[Any], what: str, *, timeout: float = 5) -> None:
    """Run a clean-up call (a cancel) that must not turn one failure into another: errors are logged, not raised."""
    try:
        async with asyncio.timeout(timeout):
            await work
    except Exception as exc:  # a clean-up failing for any reason is only worth a log line
        log.warning("%s failed: %s", what, exc)


async def submit_and_collect(backend: ProviderBackend, job: ImageJob, *, timeout: float) -> ImageResult:
    """``generate`` for a provider backend: submit, collect, and cancel the provider job unless it finished.

    The provider bills while a job runs, so a caller that gives up (an error, the deadline, a cancelled request)
    takes the job down with it; the cancel is shielded so a cancellation cannot skip it.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    ref = await with_deadline(backend.submit(job, timeout=timeout), timeout=timeout, backend=backend.name)
    try:
        return await backend.collect(job, ref, timeout=max(0.0, timeout - (loop.time() - started)))
    except BaseException:
        await asyncio.shield(backend.cancel(ref))
        raise
