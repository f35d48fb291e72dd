"""Domain errors, and the one place where they become HTTP responses in OpenAI's error format."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("hidream_gateway")

# Credentials an upstream might echo back in an error body. Redacted: a URL's ``user:password@``; the value after a
# word that introduces one (``Bearer x``, ``Token: x``, ``"api_key": "x"``, ``password=x``) when the value looks like a
# secret (letters and digits, 12 or more; a key id and its secret; a long opaque token), so that plain words after
# those keywords ("the key parameter is invalid") stay; the shapes of known credentials wherever they appear
# (Replicate r8_, Modal wk-/ws-, sk-, the gateway's hdg_ keys and whsec_ webhook secrets, fal's key_id:key_secret).
# After a bare ``key`` (not ``api_key``, ``X-Api-Key``...), what names a thing (``_NAMED``) is left. An ``id:secret``
# pair is not one when it names something: a well-known id field (``request_id:``), a hash (``sha256:<hex>``), a UUID,
# a digest of 40 or more hex digits (a Replicate version, a commit).
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


def _hide(match: re.Match[str]) -> str:
    if match.group("url"):
        return f"{match.group('url')}***@"
    return f"{match.group('lead') or match.group('keylead') or ''}***"


def redact_credentials(text: str) -> str:
    """``text`` with anything shaped like a credential replaced by ``***`` (a URL's userinfo by ``***@``).

    For the backend's own words kept for admins (an attempt's ``detail``, /admin/backends' ``last_error``) and for an
    input error a tenant is shown: the gateway never puts a credential in an error, but a provider's error body or a
    worker's load error might quote the one it was sent.
    """
    return CREDENTIALS.sub(_hide, text)


# What a tenant is told of an attempt that did not succeed: a fixed phrase per outcome. The backend's own words (a
# provider's error body, another system's internals) are kept for admins only, as the entry's ``detail``.
PHRASES: dict[str, str] = {
    "unauthorized": "its credentials were refused",
    "unreachable": "the connection failed",
    "timeout": "the backend timed out",
    "busy": "the backend is at capacity",
    "unavailable": "the backend is not ready",
    "invalid_input": "the backend rejected the input",
    "failed": "the backend failed",
}


def phrase_for(outcome: str, status: int | None) -> str:
    """The fixed words for an attempt that ended in ``outcome``, with the provider's HTTP ``status`` if any."""
    words = PHRASES.get(outcome, PHRASES["failed"])
    if outcome == "unauthorized" and status is not None:
        return f"the backend answered {status}: {words}"
    if outcome == "failed" and status is not None:  # a 5xx, or a 2xx whose body was not what it should be
        return f"the backend answered {status}" if status >= 400 else "the backend's answer was unusable"
    return words


def tenant_attempts(entries: Sequence[dict[str, Any]] | Any) -> list[dict[str, Any]] | None:
    """A job's attempt list as its tenant sees it: each entry without ``detail`` (the backend's words, for admins).

    An entry stored before ``detail`` existed has the backend's raw words in ``message``: its phrase is rebuilt from
    ``outcome`` and ``status`` instead.
    """
    if not isinstance(entries, list):  # None, or a stored value no version of the gateway wrote
        return None
    shown = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        tenant = {k: v for k, v in entry.items() if k != "detail"}
        if "detail" not in entry and tenant.get("message") is not None:
            tenant["message"] = phrase_for(str(entry.get("outcome")), entry.get("status"))
        shown.append(tenant)
    return shown


class ConfigurationError(Exception):
    """A setting the gateway cannot start with; the message is one line that names the setting.

    Raised by ``create_app(settings)`` before anything is served, so ``serve`` can print it and exit non-zero::

        hidream-gateway: replicate is enabled (HDG_BACKENDS) but REPLICATE_API_TOKEN is not set; ...
    """


class GatewayError(Exception):
    """An error a client can be told about: an HTTP status and an OpenAI-style error body.

    Raised by a backend, it is also one attempt's end: ``outcome`` names how it ended in a job's attempt list and
    ``upstream_status`` is the provider's HTTP status, when the error is its answer. A job's final error carries
    the whole list in ``attempts``, as stored (with each entry's admin-only ``detail``): ``body`` and
    ``problem_response`` show it through ``tenant_attempts``, once.
    """

    status_code = 500
    error_type = "server_error"
    code: str | None = None
    outcome = "failed"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        upstream_status: int | None = None,
        attempts: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}
        self.upstream_status = upstream_status
        self.attempts = attempts

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``, plus ``attempts`` when backends were
        tried (an extension: each is ``{"backend", "outcome", "status", "message"}``, ``message`` a fixed phrase per
        outcome; an admin-only ``detail`` is never sent).
        """
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.error_type,
            "param": self.param,
            "code": self.code,
        }
        if self.attempts is not None:
            error["attempts"] = tenant_attempts(self.attempts)
        return {"error": error}


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_value"
    outcome = "invalid_input"


class AuthenticationFailed(GatewayError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status_code = 403
    error_type = "permission_error"
    code = "permission_denied"


class NotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PayloadTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(GatewayError):
    status_code = 415
    error_type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimited(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ConcurrencyLimited(RateLimited):
    """The tenant or key already has as many jobs queued or running as it may."""

    code = "concurrency_limit_exceeded"


class BudgetExceeded(GatewayError):
    """The job's price, reserved on top of this month's spend and open reservations, would pass a budget."""

    status_code = 402
    error_type = "insufficient_quota"
    code = "budget_exceeded"


class BackendBusy(GatewayError):
    """Every backend that could serve the request is at capacity; try again after ``retry_after`` seconds."""

    status_code = 503
    error_type = "server_error"
    code = "backend_busy"
    outcome = "busy"

    def __init__(self, message: str, *, retry_after: int = 5, **kwargs: Any) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after))}, **kwargs)
        self.retry_after = retry_after


class BackendUnavailable(GatewayError):
    """No backend can take the job now (none eligible, or the one tried is not loaded): a 503, not a failure."""

    status_code = 503
    error_type = "server_error"
    code = "backend_unavailable"
    outcome = "unavailable"

    def __init__(self, message: str, *, retry_after: int | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after
        if retry_after is not None:
            self.headers["Retry-After"] = str(max(1, retry_after))


class BackendFailed(GatewayError):
    """The backend was tried and failed: an upstream error (a 5xx, a malformed answer, a failed job)."""

    status_code = 502
    error_type = "server_error"
    code = "backend_error"


class BackendUnauthorized(BackendFailed):
    """The provider refused the gateway's credentials (401/403): the operator's to fix, not the tenant's."""

    outcome = "unauthorized"


class BackendUnreachable(BackendFailed):
    """The backend could not be reached (connection refused, DNS, TLS) or dropped the connection mid-answer."""

    outcome = "unreachable"


class GenerationTimeout(GatewayError):
    status_code = 504
    error_type = "server_error"
    code = "timeout"
    outcome = "timeout"


# Replicate's API (predictions, models, webhooks) answers errors as RFC 7807 problems; the rest is OpenAI's shape.
REPLICATE_PATHS = ("/v1/predictions", "/v1/models/", "/v1/webhooks/")
TITLES = {
    401: "Unauthenticated",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request too large",
    415: "Unsupported media type",
    422: "Input validation failed",
    402: "Payment required",
    429: "Too many requests",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
    504: "Gateway timeout",
}


def error_response(exc: GatewayError, path: str = "") -> JSONResponse:
    """Render a GatewayError as a JSON response, in the error format of the API that ``path`` belongs to."""
    if path.startswith(REPLICATE_PATHS):
        return problem_response(exc)
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


def problem_response(exc: GatewayError) -> JSONResponse:
    """``application/problem+json`` as Replicate answers: input errors are 422, the rest keep their status."""
    status = 422 if exc.status_code == 400 else exc.status_code
    body: dict[str, Any] = {
        "type": f"urn:hidream-gateway:problem:{exc.code or exc.error_type}",  # a name, not a page we host
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": exc.message,
    }
    if exc.attempts is not None:  # an extension member, as RFC 7807 allows: every backend tried, in order
        body["attempts"] = tenant_attempts(exc.attempts)
    if status == 422 and exc.param:
        body["invalid_fields"] = [{"type": exc.code or "invalid", "field": exc.param, "description": exc.message}]
    return JSONResponse(body, status_code=status, headers=exc.headers, media_type="application/problem+json")


def _validation_message(error: dict[str, Any]) -> tuple[str, str | None]:
    loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    if error.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    if error.get("type") == "model_attributes_type":
        return "The request body must be a JSON object.", None
    param = ".".join(loc) or None
    msg = error.get("msg", "Invalid value")
    if param is None:
        return f"Invalid request: {msg}.", None
    if error.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    return f"Invalid value for '{param}': {msg}.", param


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to the OpenAI error format; nothing reaches the client as a bare 500 page."""

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        # Absent if the lifespan failed to start, or in an app built from some of the routers: answer all the same.
        metrics = getattr(getattr(request.app.state, "hdg", None), "metrics", None)
        if metrics is not None:
            metrics.refused(exc.code)  # limits' refusals (budget, rate, concurrency) are counted
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if first.get("loc", ("",))[0] == "body" and media_type and not media_type.endswith(("/json", "+json")):
            # The body was never read as JSON: say why, rather than that a JSON object is not one.
            unsupported = UnsupportedMediaType(
                f"Content-Type must be application/json, not '{media_type}'.", param="Content-Type"
            )
            return error_response(unsupported, request.url.path)
        message, param = _validation_message(first)
        return error_response(InvalidRequest(message, param=param), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = GatewayError(str(exc.detail), code=None)
        err.status_code, err.error_type = exc.status_code, "invalid_request_error"
        if exc.status_code == 404:
            err.message, err.code = f"Unknown path {request.url.path}.", "not_found"
        elif exc.status_code == 405:
            err.message, err.code = f"Method {request.method} is not allowed here.", "method_not_allowed"
        return error_response(err, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", None)
        log.exception("unhandled error (request %s)", request_id)
        error = GatewayError(f"Internal error; quote request id {request_id} to support.")
        return error_response(error, request.url.path)


class IdempotencyConflict(GatewayError):
    """An Idempotency-Key was reused with a different request."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "idempotency_key_reused"


class TenantExists(GatewayError):
    """A tenant with this name, in any case, already exists: names are how operators tell tenants apart."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "tenant_exists"
