"""The web console at /console: server-rendered pages for tenants and the admin, on the same services as the API.

Sign-in exchanges a key or the admin token (in a POST body, never a URL) for an HttpOnly, SameSite=Strict cookie;
every page re-checks the session in the database (gateway/console/sessions.py). Every POST after sign-in carries a
CSRF token, and any POST another site's page sent is refused (see check_origin). Errors under /console are pages,
never the API's JSON.
"""

from __future__ import annotations

import inspect
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.api.deps import public_base_url
from gateway.api.images import MAX_SEED, ImageGenerationRequest, StillRunning, generate_image
from gateway.api.submit import fingerprint_of
from gateway.auth import Principal, hash_key, issue_key, lookup_key
from gateway.backends.base import ImageJob
from gateway.console import sessions
from gateway.console.charts import series_class, stacked_bars
from gateway.console.pages import (
    PREFIX,
    SECURITY_HEADERS,
    STATIC_TYPES,
    FormError,
    code_samples,
    in_console,
    parse_form,
    render,
    static_file,
)
from gateway.console.sessions import COOKIE, COOKIE_PATH, ENDED, SessionEnded, Viewer
from gateway.console.views import (
    LATENCY_SAMPLE,
    STATS_HOURS,
    attempt_lines,
    backend_stats,
    budget,
    daily_usage,
    key_budget,
    keys_with_last_use,
    recent_failures,
    recent_predictions,
    tenants_overview,
    usd,
)
from gateway.errors import AuthenticationFailed, GatewayError, IdempotencyConflict, PermissionDenied
from gateway.health import probe_all
from gateway.metering import price_usd
from gateway.state import AppState
from gateway.storage import repo
from gateway.storage.models import is_id
from gateway.webhooks import tenant_secret
from inference.variants import MODEL_IDS, RESOLUTIONS

log = logging.getLogger("hidream_gateway.console")
router = APIRouter(prefix=PREFIX, include_in_schema=False)

TENANT_NAV = [
    ("Overview", "/console/overview"),
    ("Playground", "/console/playground"),
    ("Predictions", "/console/predictions"),
    ("Keys", "/console/keys"),
    ("Webhooks", "/console/webhooks"),
]
ADMIN_NAV = [
    ("Tenants", "/console/admin"),
    ("Backends", "/console/admin/backends"),
    ("Failures", "/console/admin/failures"),
]
SIZES = [f"{w}x{h}" for w, h in RESOLUTIONS]
DEFAULT_SIZE, DEFAULT_MODEL = "1024x1024", "hidream-i1-fast"
# The API's own bound, so the form and POST /v1/images/generations never disagree.
MAX_STEPS = next(
    int(rule.le) for rule in ImageGenerationRequest.model_fields["num_inference_steps"].metadata if hasattr(rule, "le")
)
NONCE_BYTES = 18
NONCE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
RESUBMITTED = "This form was already sent with other values. Check them and press Generate again."
RESTRICTED = "This key has its own limits, so it cannot create or revoke keys; an admin can."


class Leave(Exception):
    """Ends a console request with ``response`` (to sign-in, a 403 page): raised from dependencies."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


Handler = Callable[[Request, Exception], Response | Awaitable[Response]]


async def answer_with(handler: Handler, request: Request, exc: Exception) -> Response:
    answer = handler(request, exc)
    return await answer if inspect.isawaitable(answer) else answer


# An error page's title by status, for errors raised by the services underneath (the message says what happened).
TITLES = {
    400: "Bad request",
    401: "Not signed in",
    402: "Budget exceeded",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    429: "Too many requests",
    503: "Not available right now",
    504: "Timed out",
}


def install(app: FastAPI) -> None:
    """Add the console's routes and its exception handlers to ``app``.

    Call it after the API's handlers are installed: under /console, an HTTP error (a POST to a page that only
    answers GET: 405), a GatewayError no route caught (a 404 from a service) and an unexpected error (the database
    is down: 500) become pages with the same status; everywhere else the API's own handlers answer as before.
    """
    api_http: Handler = app.exception_handlers.get(StarletteHTTPException, http_exception_handler)
    api_unexpected: Handler | None = app.exception_handlers.get(Exception)
    api_gateway: Handler | None = app.exception_handlers.get(GatewayError)

    async def leave(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Leave)
        return exc.response

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if not in_console(request.url.path):
            return await answer_with(api_http, request, exc)
        if exc.status_code == 405:
            title, message = "Method not allowed", f"This page does not accept {request.method} requests."
        elif exc.status_code == 404:
            title, message = "Not found", "There is no such page in the console."
        else:
            title, message = "Request refused", str(exc.detail)
        return error_page(exc.status_code, title, message, headers=dict(exc.headers or {}))

    async def unexpected(request: Request, exc: Exception) -> Response:
        if not in_console(request.url.path) and api_unexpected is not None:
            return await answer_with(api_unexpected, request, exc)
        request_id = getattr(request.state, "request_id", None)
        log.exception("unhandled console error (request %s)", request_id)
        # Answered from outside every middleware (Starlette's server-error layer): the headers are added here.
        headers = dict(SECURITY_HEADERS) | ({"X-Request-Id": request_id} if request_id else {})
        return error_page(
            500,
            "Something went wrong",
            f"The console could not finish this request. Quote request id {request_id} to the gateway's admin.",
            headers=headers,
        )

    async def gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        if not in_console(request.url.path) and api_gateway is not None:
            return await answer_with(api_gateway, request, exc)
        metrics = getattr(getattr(request.app.state, "hdg", None), "metrics", None)
        if metrics is not None:  # as the API's handler counts it (a limit's refusal only)
            metrics.refused(exc.code)
        title = TITLES.get(exc.status_code, "Request refused" if exc.status_code < 500 else "The request failed")
        return error_page(exc.status_code, title, exc.message, headers=dict(exc.headers) or None)

    app.add_exception_handler(Leave, leave)
    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
    app.include_router(router)


# -- plumbing ------------------------------------------------------------------------------------------------------


def state_of(request: Request) -> AppState:
    state: AppState = request.app.state.hdg
    return state


def error_page(status: int, title: str, message: str, *, headers: dict[str, str] | None = None) -> Response:
    """A page that says what went wrong, with a way back; no navigation (the viewer may not be known)."""
    return render("error.html", status_code=status, headers=headers, title=title, message=message)


def clear_cookie(response: Response) -> Response:
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
    return response


def to_sign_in(reason: str | None) -> Response:
    """303 to the sign-in page, clearing the cookie; ``reason`` (a key of ENDED, no secret) says why."""
    where = "/console/sign-in" + (f"?ended={reason}" if reason else "")
    return clear_cookie(RedirectResponse(where, status_code=303))


def home(viewer: Viewer) -> str:
    return "/console/admin" if viewer.is_admin else "/console/overview"


DEFAULT_PORTS = {"http": 80, "https": 443}


def normal_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` in lower case, the scheme's default port left out (``https://x:443`` is
    ``https://x``); None for anything that is not an http(s) origin (``null`` included).
    """
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in DEFAULT_PORTS or not host:
        return None
    host = f"[{host}]" if ":" in host else host  # an IPv6 address
    return f"{scheme}://{host}" if port in (None, DEFAULT_PORTS[scheme]) else f"{scheme}://{host}:{port}"


def own_origins(request: Request, state: AppState) -> set[str]:
    """The origins this console is served on: the request's own (as uvicorn saw it), and HDG_PUBLIC_URL's."""
    found = {normal_origin(f"{request.url.scheme}://{request.url.netloc}")}
    if state.settings.public_url:
        found.add(normal_origin(state.settings.public_url))
    return {origin for origin in found if origin is not None}


def check_origin(request: Request, state: AppState) -> None:
    """Refuse a POST another site's page sent.

    ``Sec-Fetch-Site: same-origin`` is enough: browsers set it and no page can forge it, so this holds behind a
    proxy that hides the public origin from uvicorn. ``cross-site`` is refused. Any other value (``same-site``,
    ``none``) needs an ``Origin`` equal to this console's. Without Sec-Fetch-Site (an older browser, or a client
    that is not a browser), an ``Origin`` that is sent must be this console's (``null`` is refused: a sandboxed
    frame of any site sends it); with neither header the request is not a browser's cross-site form, and the
    session cookie (SameSite=Strict) and the CSRF token still guard everything after sign-in.
    """
    site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    if site == "same-origin":
        return
    if site == "cross-site":
        refused = True
    elif site is None and origin is None:
        refused = False
    else:
        expected = own_origins(request, state)
        refused = origin is None or normal_origin(origin) not in expected
    if refused:
        log.warning(
            "refused a console POST to %s from another site: Origin %r, Sec-Fetch-Site %r, expected one of %s"
            " (behind a proxy, set HDG_PUBLIC_URL to the public origin)",
            request.url.path,
            None if origin is None else origin[:200],
            None if site is None else site[:40],
            sorted(own_origins(request, state)),
        )
        raise Leave(error_page(403, "Forbidden", "This form was sent from another site, so it was refused."))


async def current_viewer(request: Request) -> Viewer:
    """The signed-in viewer, checked against the database now; anyone else goes to the sign-in page."""
    state = state_of(request)
    try:
        async with state.sessions() as session:
            return await sessions.resolve(
                session, cookie=request.cookies.get(COOKIE), admin_fingerprint=state.admin_fingerprint
            )
    except SessionEnded as ended:
        raise Leave(to_sign_in(ended.reason)) from None


ViewerDep = Annotated[Viewer, Depends(current_viewer)]


async def tenant_viewer(viewer: ViewerDep) -> Viewer:
    if viewer.is_admin:  # the admin has no tenant pages of its own
        raise Leave(RedirectResponse("/console/admin", status_code=303))
    return viewer


async def admin_viewer(viewer: ViewerDep) -> Viewer:
    if not viewer.is_admin:
        raise Leave(error_page(403, "Forbidden", "These pages are for the gateway's admin."))
    return viewer


TenantDep = Annotated[Viewer, Depends(tenant_viewer)]
AdminDep = Annotated[Viewer, Depends(admin_viewer)]


async def read_form(request: Request, state: AppState, viewer: Viewer | None) -> dict[str, str]:
    """The POSTed form, after the origin check and (signed in) the CSRF check; 400 or 403 pages otherwise."""
    check_origin(request, state)
    try:
        form = parse_form(await request.body(), request.headers.get("content-type"))
    except FormError as exc:
        raise Leave(error_page(400, "Bad request", f"This request could not be read: {exc}.")) from None
    if viewer is not None and not sessions.csrf_ok(state.console_key, viewer.cookie, form.get("csrf")):
        raise Leave(
            error_page(403, "Forbidden", "This form has expired or did not come from this console. Reload the page.")
        )
    return form


def page(template: str, request: Request, viewer: Viewer, *, status_code: int = 200, **context: Any) -> Response:
    """A page of the signed-in console: its layout needs the viewer, the navigation and the CSRF token."""
    state = state_of(request)
    return render(
        template,
        status_code=status_code,
        headers=context.pop("headers", None),
        viewer=viewer,
        nav=ADMIN_NAV if viewer.is_admin else TENANT_NAV,
        path=request.url.path,
        csrf=sessions.csrf_token(state.console_key, viewer.cookie),
        **context,
    )


# -- sign-in -------------------------------------------------------------------------------------------------------


@router.get("")
async def console_root(request: Request) -> Response:
    """Wherever the viewer belongs: sign-in, the tenant's overview or the admin's tenants."""
    viewer = await current_viewer(request)
    return RedirectResponse(home(viewer), status_code=303)


def sign_in_form(*, status_code: int = 200, error: str | None = None, notice: str | None = None, **kw: Any) -> Response:
    return render("sign_in.html", status_code=status_code, error=error, notice=notice, **kw)


@router.get("/sign-in")
async def sign_in_page(request: Request, ended: str | None = None) -> Response:
    try:
        viewer = await current_viewer(request)
    except Leave:
        form = sign_in_form(notice=ENDED.get(ended or ""))
        # A cookie that names no session any more is cleared here too, not sent with every page from now on.
        return clear_cookie(form) if COOKIE in request.cookies else form
    return RedirectResponse(home(viewer), status_code=303)


@router.post("/sign-in")
async def sign_in(request: Request) -> Response:
    """A key or the admin token for a session cookie; failures are counted per client address and throttled.

    Each attempt counts as a failure until its credentials prove right (then it is forgiven), so sign-ins sent
    all at once are throttled like sign-ins sent one after another.
    """
    state = state_of(request)
    form = await read_form(request, state, None)
    client = request.client.host if request.client else "unknown"
    wait = state.sign_ins.attempt(client)
    if wait:
        return sign_in_form(
            status_code=429,
            error=f"Too many failed sign-ins from your address; try again in {wait} s.",
            headers={"Retry-After": str(wait)},
        )
    given = form.get("token", "").strip()
    if not given:
        state.sign_ins.forgive(client)  # nothing was guessed
        return sign_in_form(status_code=400, error="Enter an API key or the admin token.")
    admin = state.settings.admin_token
    hours = state.settings.console_session_hours
    replacing = request.cookies.get(COOKIE)  # this browser's previous session, replaced by the new one
    async with state.sessions.begin() as session:
        if admin is not None and sessions.is_admin_token(given, admin.get_secret_value()):
            assert state.admin_fingerprint is not None  # computed at start-up whenever an admin token is set
            state.sign_ins.forgive(client)
            cookie, _ = await sessions.start_admin_session(
                session, fingerprint=state.admin_fingerprint, hours=hours, replacing=replacing
            )
            where = "/console/admin"
        else:
            try:
                principal = await lookup_key(session, hash_key(given))
            except AuthenticationFailed:
                return sign_in_form(status_code=401, error="That key or token was not recognised.")
            except PermissionDenied as exc:
                if exc.code != "api_key_revoked":
                    state.sign_ins.forgive(client)  # a real, live key of a disabled tenant: no guess
                return sign_in_form(status_code=403, error=exc.message)
            state.sign_ins.forgive(client)  # a real key: no guess
            cookie, _ = await sessions.start_tenant_session(
                session, key=principal.key, hours=hours, replacing=replacing
            )
            where = "/console/overview"
    response = RedirectResponse(where, status_code=303)
    secure = request.url.scheme == "https" or state.settings.console_secure_cookie
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=int(hours * 3600),
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=secure,
    )
    return response


@router.post("/sign-out")
async def sign_out(request: Request, viewer: ViewerDep) -> Response:
    state = state_of(request)
    await read_form(request, state, viewer)
    async with state.sessions.begin() as session:
        await repo.delete_console_session(session, session_id=viewer.row.id)
    return to_sign_in("signed-out")


# -- tenant pages --------------------------------------------------------------------------------------------------


@router.get("/overview")
async def overview(request: Request, viewer: TenantDep, by: str = "model") -> Response:
    """Budget this month, and images and spend per day of the last 30, by model or backend."""
    if by not in ("model", "backend"):
        return error_page(400, "Bad request", "'by' must be 'model' or 'backend'.")
    assert viewer.tenant is not None
    state, now = state_of(request), datetime.now(UTC)
    assert viewer.key is not None
    async with state.sessions() as session:
        money = await budget(session, tenant=viewer.tenant, now=now)
        own = await key_budget(session, key=viewer.key, now=now)
        usage = await daily_usage(session, tenant_id=viewer.tenant.id, by=by, now=now)
    images_chart = stacked_bars(
        title="Images per day",
        days=usage.days,
        series=usage.series,
        value=lambda day, name: usage.images.get((day, name), 0),
        label=lambda v: f"{v:g}",
        whole=True,
    )
    spend_chart = stacked_bars(
        title="Spend per day (USD)",
        days=usage.days,
        series=usage.series,
        value=lambda day, name: usage.spend.get((day, name), 0),
        label=lambda v: usd(round(v), micros=True),
    )
    return page(
        "overview.html",
        request,
        viewer,
        budget=money,
        key_budget=own,
        usage=usage,
        by=by,
        images_chart=images_chart,
        spend_chart=spend_chart,
        series_class=series_class,
    )


def playground_defaults() -> dict[str, str]:
    return {"prompt": "", "model": DEFAULT_MODEL, "size": DEFAULT_SIZE, "seed": "", "steps": ""}


def playground(request: Request, viewer: Viewer, *, status_code: int = 200, **context: Any) -> Response:
    """The playground's page. Each form gets a new ``nonce``: sending that form twice (a double click, a reload of
    the POST) replays the first job instead of making and billing a second one.
    """
    context.setdefault("values", playground_defaults())
    context.setdefault("errors", {})
    context["nonce"] = secrets.token_urlsafe(NONCE_BYTES)
    return page(
        "playground.html",
        request,
        viewer,
        status_code=status_code,
        models=sorted(MODEL_IDS),
        sizes=SIZES,
        max_seed=MAX_SEED,
        max_steps=MAX_STEPS,
        **context,
    )


@router.get("/playground")
async def playground_page(request: Request, viewer: TenantDep, prediction: str | None = None) -> Response:
    """The form; with ``prediction`` (where a generation redirects), that prediction's result under it.

    Reloading the result reads the stored prediction again: nothing is generated, nothing billed.
    """
    if not prediction:  # none, or an empty ?prediction=: just the form
        return playground(request, viewer)
    assert viewer.tenant is not None
    state = state_of(request)
    async with state.sessions() as session:
        p = await repo.get_prediction(session, tenant_id=viewer.tenant.id, prediction_id=prediction)
        files = await repo.list_files(session, prediction_id=p.id) if p is not None else []
    if p is None:  # unknown, malformed, or another tenant's
        return error_page(404, "Not found", "There is no such prediction.")
    sent = p.params.get("input")  # the request as it was sent, so a seed left empty stays empty
    sent = sent if isinstance(sent, dict) else {}
    steps = sent.get("num_inference_steps") if isinstance(sent.get("num_inference_steps"), int) else None
    values = {
        "prompt": p.prompt,
        "model": p.model,
        "size": f"{p.width}x{p.height}",
        "seed": str(sent["seed"]) if isinstance(sent.get("seed"), int) else "",
        "steps": "" if steps is None else str(steps),
    }
    if p.status != "succeeded" or not files:
        return playground(request, viewer, values=values, unfinished=p)
    samples = code_samples(
        base_url=public_base_url(request, state),
        model=p.model,
        prompt=p.prompt,
        size=f"{p.width}x{p.height}",
        seed=p.seed,
        steps=steps,
    )
    image = state.signer.sign("", files[0].id)  # relative: the page's own origin (CSP img-src 'self')
    return playground(request, viewer, values=values, result=p, image_url=image, samples=samples)


def _whole(text: str, low: int, high: int) -> int | None:
    try:
        value = int(text, 10)
    except ValueError:
        return None
    return value if low <= value <= high else None


def check_playground(values: dict[str, str], max_chars: int) -> tuple[dict[str, str], ImageGenerationRequest | None]:
    """The form's problems by field, or the request it makes (the API's own checks then apply as well)."""
    errors: dict[str, str] = {}
    prompt = values["prompt"]
    if not prompt.strip():
        errors["prompt"] = "Enter a prompt."
    elif len(prompt) > max_chars:
        errors["prompt"] = f"The prompt is {len(prompt)} characters long; the limit is {max_chars}."
    elif "\x00" in prompt:
        errors["prompt"] = "The prompt must not contain NUL characters."
    if values["model"] not in MODEL_IDS:
        errors["model"] = "Choose one of the listed models."
    if values["size"] not in SIZES:
        errors["size"] = "Choose one of the listed sizes."
    seed = _whole(values["seed"], 0, MAX_SEED) if values["seed"] else None
    if values["seed"] and seed is None:
        errors["seed"] = f"The seed must be a whole number from 0 to {MAX_SEED}, or empty for a random one."
    steps = _whole(values["steps"], 1, MAX_STEPS) if values["steps"] else None
    if values["steps"] and steps is None:
        errors["steps"] = f"Steps must be a whole number from 1 to {MAX_STEPS}, or empty for the model's default."
    if errors:
        return errors, None
    body = ImageGenerationRequest(
        prompt=prompt, model=values["model"], size=values["size"], seed=seed, num_inference_steps=steps
    )
    return {}, body


def fingerprint(body: ImageGenerationRequest) -> str:
    """What a playground nonce is bound to: the request the form made (not the form's bytes, which carry the CSRF
    token and the nonce itself), so the same form sent again is the same request.
    """
    return fingerprint_of("/console/playground", body.model_dump(mode="json"))


@router.post("/playground")
async def generate(request: Request, viewer: TenantDep) -> Response:
    """One image through the same path as POST /v1/images/generations, with this session's tenant and key.

    Made, it answers 303 to the result's own page (POST-redirect-GET), so reloading that page bills nothing; so
    does a job still running when the wait runs out (its page says so). The form's nonce is the job's
    Idempotency-Key: the same form sent again (a double click, a reload of this POST) gets the first job, not a
    second bill. A refusal (nothing billed) is shown at once, the form as it was typed.
    """
    state = state_of(request)
    form = await read_form(request, state, viewer)
    values = {name: form.get(name, default).strip() for name, default in playground_defaults().items()}
    values["prompt"] = form.get("prompt", "")  # kept as typed
    nonce = form.get("nonce") or None  # absent from a client that is not this console's form: no replay
    if nonce is not None and not NONCE.match(nonce):
        return error_page(400, "Bad request", "This form could not be read. Reload the page and try again.")
    errors, body = check_playground(values, state.settings.max_prompt_chars)
    if body is None:
        return playground(request, viewer, status_code=400, values=values, errors=errors)
    assert viewer.tenant is not None and viewer.key is not None
    principal = Principal(tenant=viewer.tenant, key=viewer.key)
    try:
        generated = await generate_image(
            body,
            principal=principal,
            state=state,
            request=request,
            idempotency_key=None if nonce is None else f"console-{nonce}",
            fingerprint=fingerprint(body),
        )
    except StillRunning as running:  # it goes on (and may be billed): show its page, never a form to re-send
        return RedirectResponse(f"/console/playground?prediction={running.prediction_id}", status_code=303)
    except IdempotencyConflict:  # this form (its nonce) was sent before with other values: a fresh form
        return playground(request, viewer, status_code=409, values=values, failure=RESUBMITTED)
    except GatewayError as exc:
        state.metrics.refused(exc.code)  # counts only a limit's refusal (budget, rate, concurrency), never a 502/504
        field = exc.param if exc.param in values else None
        return playground(
            request,
            viewer,
            status_code=exc.status_code,
            headers=exc.headers or None,
            values=values,
            errors={field: exc.message} if field else {},
            failure=None if field else exc.message,
        )
    if generated is None:  # the browser went away; nobody reads this
        return Response(status_code=499)
    return RedirectResponse(f"/console/playground?prediction={generated.done.prediction.id}", status_code=303)


@router.get("/predictions")
async def predictions_page(request: Request, viewer: TenantDep) -> Response:
    assert viewer.tenant is not None
    state = state_of(request)
    async with state.sessions() as session:
        rows = await recent_predictions(session, tenant_id=viewer.tenant.id)
    thumbs = {r.prediction.id: state.signer.sign("", r.thumbnail.id) for r in rows if r.thumbnail is not None}
    return page("predictions.html", request, viewer, rows=rows, thumbs=thumbs)


async def keys_page(
    request: Request, viewer: Viewer, *, new_key: str | None = None, status_code: int = 200
) -> Response:
    assert viewer.tenant is not None
    async with state_of(request).sessions() as session:
        rows = await keys_with_last_use(session, tenant_id=viewer.tenant.id)
    return page(
        "keys.html", request, viewer, status_code=status_code, rows=rows, new_key=new_key, restricted=RESTRICTED
    )


def may_manage_keys(viewer: Viewer) -> None:
    """Creating and revoking keys needs an unrestricted key (see Viewer.can_manage_keys): else a 403 page."""
    if not viewer.can_manage_keys:
        raise Leave(error_page(403, "Forbidden", RESTRICTED))


@router.get("/keys")
async def keys(request: Request, viewer: TenantDep) -> Response:
    return await keys_page(request, viewer)


@router.post("/keys")
async def create_key(request: Request, viewer: TenantDep) -> Response:
    """A new key, shown in this response only (never through a redirect, so never in a URL or a history entry)."""
    state = state_of(request)
    await read_form(request, state, viewer)
    may_manage_keys(viewer)
    assert viewer.tenant is not None
    async with state.sessions.begin() as session:
        _, plaintext = await issue_key(session, tenant_id=viewer.tenant.id)
    return await keys_page(request, viewer, new_key=plaintext, status_code=201)


@router.post("/keys/{key_id}/revoke")
async def revoke_key(key_id: str, request: Request, viewer: TenantDep) -> Response:
    """Revoke one of the tenant's keys (another tenant's, or no key at all, is a 404); the API refuses it at once."""
    state = state_of(request)
    await read_form(request, state, viewer)
    may_manage_keys(viewer)
    assert viewer.tenant is not None
    async with state.sessions.begin() as session:
        key = await repo.get_key(session, key_id=key_id) if is_id(key_id, "key") else None
        if key is None or key.tenant_id != viewer.tenant.id:
            return error_page(404, "Not found", "There is no such key.")
        await repo.revoke_key(session, key_id=key.id)
    state.authenticator.clear()  # this process's API cache; other replicas within HDG_AUTH_CACHE_SECONDS
    return RedirectResponse("/console/keys", status_code=303)


@router.get("/webhooks")
async def webhooks_page(request: Request, viewer: TenantDep) -> Response:
    assert viewer.tenant is not None
    async with state_of(request).sessions.begin() as session:
        secret = await tenant_secret(session, tenant_id=viewer.tenant.id)
    return page("webhooks.html", request, viewer, secret=secret)


# -- admin pages ---------------------------------------------------------------------------------------------------


@router.get("/admin")
@router.get("/admin/tenants")
async def admin_tenants(request: Request, viewer: AdminDep) -> Response:
    async with state_of(request).sessions() as session:
        rows = await tenants_overview(session, now=datetime.now(UTC))
    return page("admin_tenants.html", request, viewer, rows=rows)


@router.get("/admin/backends")
async def admin_backends(request: Request, viewer: AdminDep) -> Response:
    """Each backend's state (as /readyz names it), load, latency, error rate, prices and this month's cost."""
    state = state_of(request)
    await probe_all(state.health, state.backends, fresh_seconds=state.health.probe_seconds)  # as /admin/backends
    health = state.health.snapshot()
    now = datetime.now(UTC)
    async with state.sessions() as session:
        stats = await backend_stats(session, names=[b.name for b in state.backends], now=now)
    sample = ImageJob(variant="fast", prompt="", width=1024, height=1024, seed=0)
    price = price_usd(state.runner.prices, model="hidream-i1-fast", width=1024, height=1024, images=1)
    rows = [
        {
            "name": b.name,
            "kind": b.kind,
            "state": health[b.name]["state"],
            "in_flight": health[b.name]["in_flight"],
            "max_in_flight": health[b.name]["max_in_flight"],
            "stats": stats[b.name],
            "price": price,
            "cost": state.runner.cost(b, sample) if "fast" in b.variants else None,
        }
        for b in state.backends
    ]
    return page(
        "admin_backends.html",
        request,
        viewer,
        rows=rows,
        stats_hours=STATS_HOURS,
        latency_sample=LATENCY_SAMPLE,
    )


@router.get("/admin/failures")
async def admin_failures(request: Request, viewer: AdminDep) -> Response:
    async with state_of(request).sessions() as session:
        rows = await recent_failures(session)
    return page("admin_failures.html", request, viewer, rows=rows, attempt_lines=attempt_lines)


# -- static files and unknown pages --------------------------------------------------------------------------------


@router.get("/static/{name}")
async def static(name: str, v: str | None = None) -> Response:
    """The stylesheet and the script, from the package; cached for a year when asked for by their current hash."""
    if name not in STATIC_TYPES:
        return error_page(404, "Not found", "There is no such file.")
    data, digest = static_file(name)
    cache = "public, max-age=31536000, immutable" if v == digest else "no-cache"
    return Response(data, media_type=STATIC_TYPES[name], headers={"Cache-Control": cache})


@router.get("/{rest:path}")
async def unknown(rest: str) -> Response:
    if not rest:  # /console/
        return RedirectResponse("/console", status_code=303)
    return error_page(404, "Not found", "There is no such page in the console.")
