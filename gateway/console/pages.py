"""Rendering for the console: the Jinja environment (autoescaped), its static files, headers, forms, code samples."""

from __future__ import annotations

import hashlib
import json
import shlex
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.datastructures import MutableHeaders
from starlette.responses import HTMLResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.console.views import usd
from gateway.usage import money

PREFIX = "/console"
# Nothing inline and nothing from elsewhere: a prompt or tenant name that slipped past escaping still could not run.
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: a browser then sends its real Origin with the console's own form posts (under
    # no-referrer it sends "Origin: null", which a sandboxed page of another site can send too). Console URLs hold
    # no secrets, and other sites get no referrer at all.
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}
STATIC_TYPES = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}
MAX_FIELDS = 20


@cache
def static_file(name: str) -> tuple[bytes, str]:
    """A packaged static file's bytes and a short hash of them (for cache-busting URLs)."""
    data = resources.files("gateway.console").joinpath("static", name).read_bytes()
    return data, hashlib.sha256(data).hexdigest()[:12]


def static_url(name: str) -> str:
    """``/console/static/console.css?v=<hash>``: a URL that changes whenever the file does, so it can be cached."""
    return f"{PREFIX}/static/{name}?v={static_file(name)[1]}"


@cache
def environment() -> Environment:
    """The templates, autoescaped (every value is HTML-escaped unless marked safe), packaged with the gateway."""
    env = Environment(
        loader=PackageLoader("gateway.console", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["static_url"] = static_url
    env.filters["usd"] = usd
    env.filters["micros"] = money  # exact, as /v1/usage's price_usd
    env.filters["when"] = lambda at: at.strftime("%Y-%m-%d %H:%M:%S UTC") if at is not None else ""
    return env


def render(template: str, *, status_code: int = 200, headers: dict[str, str] | None = None, **context: Any) -> Response:
    """A console page; pages are never cached (they show balances, keys and secrets)."""
    html = environment().get_template(template).render(**context)
    response = HTMLResponse(html, status_code=status_code, headers=headers)
    response.headers["Cache-Control"] = "no-store"
    return response


def in_console(path: str) -> bool:
    """Whether ``path`` is one of the console's (``/console`` or below it)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


class ConsoleHeadersMiddleware:
    """Put the console's security headers on every answer under /console, errors and 413s included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not in_console(path):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if "cache-control" not in headers:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


class FormError(ValueError):
    """A body that is not a form this console sent."""


def parse_form(body: bytes, content_type: str | None) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body as {name: first value}; FormError for anything else."""
    media = (content_type or "").partition(";")[0].strip().lower()
    if not body:  # a form with no fields (its checks then say what is missing)
        return {}
    if media != "application/x-www-form-urlencoded":
        raise FormError("expected a form (application/x-www-form-urlencoded)")
    try:
        text = body.decode("utf-8")
        fields = parse_qs(text, keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_FIELDS)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormError("the form could not be read") from exc
    return {name: values[0] for name, values in fields.items()}


# -- the playground's "same request as code" -----------------------------------------------------------------------


def code_samples(*, base_url: str, model: str, prompt: str, size: str, seed: int, steps: int | None) -> dict[str, str]:
    """The request just made, as curl, Python ``openai`` and Python ``replicate``; the key comes from $HDG_API_KEY."""
    base = base_url.rstrip("/")
    body: dict[str, Any] = {"model": model, "prompt": prompt, "size": size, "seed": seed}
    if steps is not None:
        body["num_inference_steps"] = steps
    curl = (
        f"curl -s {shlex.quote(base + '/v1/images/generations')} \\\n"
        '  -H "Authorization: Bearer $HDG_API_KEY" \\\n'
        "  -H 'Content-Type: application/json' \\\n"
        f"  -d {shlex.quote(json.dumps(body, ensure_ascii=False))}"
    )
    extra = {"seed": seed} | ({"num_inference_steps": steps} if steps is not None else {})
    openai = (
        "import os\n\nfrom openai import OpenAI\n\n"
        f'client = OpenAI(base_url={json.dumps(base + "/v1")}, api_key=os.environ["HDG_API_KEY"])\n'
        "result = client.images.generate(\n"
        f"    model={json.dumps(model)},\n"
        f"    prompt={json.dumps(prompt, ensure_ascii=False)},\n"
        f"    size={json.dumps(size)},\n"
        f"    extra_body={json.dumps(extra)},\n"
        ")\n"
        "print(result.data[0].url)\n"
    )
    width, _, height = size.partition("x")
    inputs: dict[str, Any] = {"prompt": prompt, "width": int(width), "height": int(height), "seed": seed}
    if steps is not None:
        inputs["num_inference_steps"] = steps
    replicate = (
        "import os\n\nimport replicate\n\n"
        f'client = replicate.Client(api_token=os.environ["HDG_API_KEY"], base_url={json.dumps(base)})\n'
        "output = client.run(\n"
        f"    {json.dumps('hidream-ai/' + model)},\n"
        f"    input={json.dumps(inputs, ensure_ascii=False)},\n"
        ")\n"
        "print(output[0])\n"
    )
    return {"curl": curl, "Python (openai)": openai, "Python (replicate)": replicate}
