"""Replicate's view of a job: model names and versions, and the prediction object its clients read."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from gateway.errors import tenant_attempts
from gateway.storage.files import UrlSigner
from gateway.storage.models import Prediction, StoredFile
from inference.variants import VARIANTS, Variant

OWNER = "hidream-ai"
MODELS: dict[str, Variant] = {f"{OWNER}/{v.model_id}": v for v in VARIANTS.values()}
# One stable version id per model, so ``owner/name:<id>`` and bare-id references work like Replicate's.
VERSIONS: dict[str, str] = {name: hashlib.sha256(f"{name}@1".encode()).hexdigest() for name in MODELS}
_BY_VERSION: dict[str, str] = {version: name for name, version in VERSIONS.items()}


def resolve(ref: str) -> tuple[str, Variant] | None:
    """``owner/name``, ``owner/name:<version>`` or a bare version id -> (model name, variant); None if unknown."""
    name, _, version = ref.partition(":")
    if not version and name in _BY_VERSION:
        name = _BY_VERSION[name]
    if name not in MODELS or (version and VERSIONS[name] != version):
        return None
    return name, MODELS[name]


def model_name(model_id: str) -> str:
    """The Replicate-style name of a gateway model id (``hidream-i1-fast`` -> ``hidream-ai/hidream-i1-fast``)."""
    return f"{OWNER}/{model_id}"


def iso(at: datetime | None) -> str | None:
    """RFC 3339 in UTC with a ``Z``, as Replicate writes times."""
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if at is not None else None


def prediction_json(
    p: Prediction, files: Sequence[StoredFile], *, signer: UrlSigner, base_url: str, status: str | None = None
) -> dict[str, Any]:
    """The prediction object, as Replicate's API and webhooks send it.

    ``status`` overrides the stored one: an unfinished ``Prefer: wait`` answer says ``starting``, which is what
    Replicate answers there and what its client takes to mean "poll on".
    """
    base = base_url.rstrip("/")
    get_url = f"{base}/v1/predictions/{p.id}"
    name = model_name(p.model)
    metrics: dict[str, float] = {}
    if p.completed_at is not None:
        metrics["total_time"] = round((p.completed_at - p.created_at).total_seconds(), 3)
        if p.started_at is not None:
            metrics["predict_time"] = round((p.completed_at - p.started_at).total_seconds(), 3)
    output = [signer.sign(base, f.id) for f in sorted(files, key=lambda f: f.position)] if files else None
    return {
        "id": p.id,
        "model": name,
        "version": VERSIONS.get(name, ""),
        "input": p.params.get("input", {"prompt": p.prompt}),
        "output": output if p.status == "succeeded" else None,
        "logs": p.logs or "",
        "error": p.error if p.status == "failed" else None,
        # An extension: every backend tried, once the prediction has ended (null before); ``error`` stays the string
        # Replicate's clients read. The tenant's view: each attempt's phrase, not the backend's words (``detail``).
        "attempts": tenant_attempts(p.attempt_log),
        "status": status or p.status,
        "created_at": iso(p.created_at),
        "started_at": iso(p.started_at),
        "completed_at": iso(p.completed_at),
        "urls": {"get": get_url, "cancel": f"{get_url}/cancel", "web": get_url},
        "metrics": metrics,
        "data_removed": False,
        "source": "api",
        "webhook": p.webhook,
        "webhook_events_filter": p.webhook_events,
    }
