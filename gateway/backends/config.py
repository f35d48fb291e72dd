"""What each backend needs from the settings, checked before the gateway serves.

A backend enabled in HDG_BACKENDS whose settings cannot work (a missing or malformed credential or URL) stops the
start with one line naming the setting, unless HDG_OPTIONAL_BACKENDS lists it: then it stands in as a
``Misconfigured`` backend, shown as such by /readyz and /admin/backends and never routed to.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import httpx

from gateway.backends.base import ImageJob, ImageResult
from gateway.errors import BackendUnavailable, ConfigurationError
from gateway.settings import Settings

log = logging.getLogger("hidream_gateway.backends")

# What an HTTP header value may carry; httpx refuses anything else only when the first request is sent.
HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
# fal keys are "key_id:key_secret" (https://docs.fal.ai/authentication).
FAL_KEY = re.compile(r"[^:\s]+:[^:\s]+")
# Replicate models are "owner/name", optionally pinned as "owner/name:version".
REPLICATE_MODEL = re.compile(r"[\w.-]+/[\w.-]+(:\w+)?")
# fal apps are "owner/app", sometimes with a sub-path ("fal-ai/flux/dev").
FAL_APP = re.compile(r"[\w.-]+/[\w./-]+")
VARIANTS = frozenset({"full", "dev", "fast"})


# ``scheme://user:pass@`` at the start of a URL, even one httpx cannot parse: the part a message must not echo.
USERINFO = re.compile(r"^(?P<scheme>[^:/?#\s]*://)?(?P<userinfo>[^/?#\s]*)@")


def redact_userinfo(value: str) -> str:
    """``value`` with a URL's ``user:pass@`` shown as ``***@``: start-up messages go to terminals and logs."""
    return USERINFO.sub(lambda m: f"{m.group('scheme') or ''}***@", value, count=1)


def _url_problem(setting: str, value: str) -> str | None:
    """Why ``value`` (from ``setting``) is not an http(s) URL with a host, or None."""
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError):
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host or not 0 < (url.port or 80) < 65536:
        return f"{setting} {redact_userinfo(value)!r} is not an http(s) URL such as https://host:port"
    return None


def _secret_problem(kind: str, setting: str, value: str | None) -> str | None:
    if value is None or not value.strip():
        return f"{kind} is enabled (HDG_BACKENDS) but {setting} is not set"
    if not HEADER_SAFE.fullmatch(value):
        return f"{setting} contains spaces or characters an HTTP header cannot carry; check how it was pasted"
    return None


def _names_problem(setting: str, names: dict[str, str], pattern: re.Pattern[str], shape: str) -> str | None:
    if not names:
        return f"{setting} maps no variant to a model"
    unknown = sorted(set(names) - VARIANTS)
    if unknown:
        return f"{setting} names unknown variants {unknown}; known: full, dev, fast"
    bad = sorted(v for v in names.values() if not pattern.fullmatch(v))
    return f"{setting} has {bad[0]!r}, which is not {shape}" if bad else None


def _secret(settings: Settings, name: str) -> str | None:
    value = getattr(settings, name)
    return value.get_secret_value() if value is not None else None


def replicate_problem(settings: Settings) -> str | None:
    """Why the replicate backend cannot work with ``settings``, or None."""
    return (
        _secret_problem("replicate", "REPLICATE_API_TOKEN", _secret(settings, "replicate_api_token"))
        or _url_problem("HDG_REPLICATE_BASE_URL", settings.replicate_base_url)
        or _names_problem("HDG_REPLICATE_MODELS", settings.replicate_models, REPLICATE_MODEL, "owner/name")
    )


def fal_problem(settings: Settings) -> str | None:
    """Why the fal backend cannot work with ``settings``, or None."""
    key = _secret(settings, "fal_key")
    problem = _secret_problem("fal", "FAL_KEY", key)
    if problem is None and key is not None and not FAL_KEY.fullmatch(key):
        problem = "FAL_KEY is not shaped key_id:key_secret (copy both parts of the key fal showed)"
    return (
        problem
        or _url_problem("HDG_FAL_BASE_URL", settings.fal_base_url)
        or _names_problem("HDG_FAL_APPS", settings.fal_apps, FAL_APP, "owner/app")
    )


def worker_problem(settings: Settings) -> str | None:
    """Why the worker backend cannot work with ``settings``, or None."""
    if not settings.worker_urls:
        return "worker is enabled (HDG_BACKENDS) but HDG_WORKER_URLS is not set"
    for url in settings.worker_urls:
        if problem := _url_problem("HDG_WORKER_URLS entry", url):
            return problem
    token = _secret(settings, "worker_token")
    if token is not None and not HEADER_SAFE.fullmatch(token):
        return "HDG_WORKER_TOKEN contains spaces or characters an HTTP header cannot carry"
    key, secret = _secret(settings, "modal_key"), _secret(settings, "modal_secret")
    if bool(key) != bool(secret):  # one without the other sends no proxy auth, and Modal answers 401
        return "HDG_MODAL_KEY and HDG_MODAL_SECRET go together: set both, or neither"
    return None


def local_problem(settings: Settings) -> str | None:
    """Why the local backend cannot work with ``settings``, or None (a model that fails to load shows later)."""
    if settings.local_model != "tiny" and not Path(settings.local_model).is_dir():
        return f"HDG_LOCAL_MODEL {settings.local_model!r} is neither 'tiny' nor a diffusers HiDream directory"
    if settings.local_llama_path is not None and not settings.local_llama_path.exists():
        return f"HDG_LOCAL_LLAMA_PATH {str(settings.local_llama_path)!r} does not exist"
    if not settings.local_variants:
        return "local is enabled (HDG_BACKENDS) but HDG_LOCAL_VARIANTS is empty"
    return None


CHECKS: dict[str, Callable[[Settings], str | None]] = {
    "local": local_problem,
    "worker": worker_problem,
    "replicate": replicate_problem,
    "fal": fal_problem,
}


def misconfigured(settings: Settings) -> dict[str, str]:
    """The optional backends whose settings cannot work, each with the line that says why.

    Raises ConfigurationError for the first enabled backend that is not optional and cannot work.
    """
    found: dict[str, str] = {}
    for kind in settings.backends:
        problem = CHECKS[kind](settings)
        if problem is None:
            continue
        if kind not in settings.optional_backends:
            raise ConfigurationError(f"{problem}; fix it, or add {kind} to HDG_OPTIONAL_BACKENDS to start without it")
        log.warning("%s is misconfigured and will not be used (HDG_OPTIONAL_BACKENDS): %s", kind, problem)
        found[kind] = problem
    return found


def variants_of(kind: str, settings: Settings) -> frozenset[str]:
    """The variants a backend of ``kind`` would serve, as configured."""
    if kind == "replicate":
        return frozenset(settings.replicate_models) & VARIANTS
    if kind == "fal":
        return frozenset(settings.fal_apps) & VARIANTS
    return frozenset(settings.local_variants if kind == "local" else settings.worker_variants)


class Misconfigured:
    """Stands in for an optional backend whose settings cannot work: listed everywhere, never routed to.

    Example::

        backend = Misconfigured("fal", problem="fal is enabled (HDG_BACKENDS) but FAL_KEY is not set", variants=...)
        await backend.ready()  # False, always
    """

    def __init__(self, kind: str, *, problem: str, variants: frozenset[str]) -> None:
        self.name = self.kind = kind
        self.problem = problem
        self.variants = variants  # so a 503 can say it would have served the job, had it been configured

    async def generate(self, job: ImageJob, *, timeout: float) -> ImageResult:
        """Never routed to (its health board entry never admits); refuses if called all the same."""
        raise BackendUnavailable(f"{self.name} is misconfigured.")

    async def ready(self) -> bool:
        return False

    async def aclose(self) -> None:
        """Nothing to release."""
