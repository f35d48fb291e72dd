"""Starting servers from the command line: the gateway (one process or several) and the GPU worker.

The slow steps come first, each with progress on stderr: migrations, and building the tiny model on a first start.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.settings import Settings
from gateway.storage.db import open_database
from gateway.terminal import CliError, step

if TYPE_CHECKING:
    from fastapi import FastAPI

# In the metrics directory of `serve --workers N`: locked while a gateway serves with that directory.
SERVING_LOCK = ".serving.lock"


def migrate(settings: Settings) -> None:
    """Bring the database to the latest schema revision."""

    async def main() -> None:
        async with open_database(settings.resolved_database_url):
            pass

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with step("Migrating the database...", "Database schema is up to date"):
        asyncio.run(main())


def build_tiny_model(settings: Settings) -> None:
    """Build the tiny model (HDG_LOCAL_MODEL=tiny) before anything loads it: a first start spends a while on it."""
    if settings.local_model != "tiny":
        return
    from inference.tiny import build_tiny_pipeline, tiny_pipeline_built  # the inference extra: only when used

    root = settings.models_dir / "tiny"
    if tiny_pipeline_built(root):
        return
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # its bars, one per component saved, would break up the spinner
    try:
        with step(f"Building the tiny model under {root} (first start only)...", "Built the tiny model"):
            build_tiny_pipeline(root)
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def prepare(settings: Settings) -> None:
    """The slow steps before a gateway serves: migrations, and the tiny model if the local backend uses it."""
    migrate(settings)
    if "local" in settings.backends:
        build_tiny_model(settings)


def serve(settings: Settings, *, host: str, port: int, workers: int = 1) -> None:
    """Run the gateway in ``workers`` processes until it is stopped.

    Raises ConfigurationError first, before any slow step, when an enabled backend's settings cannot work.
    """
    if workers == 1:
        app = gateway_app(settings)
        prepare(settings)
        serve_app(app, host=host, port=port)
        return
    if "local" in settings.backends:
        raise CliError("--workers > 1 would load the local model once per process: serve it with one worker")
    from gateway.backends.config import misconfigured

    misconfigured(settings)  # here, once: each worker process would raise it in a traceback of its own
    import fcntl

    import uvicorn

    from gateway.metrics import MULTIPROC_ENV

    # Metrics: each worker writes its values to files in one directory and /metrics, in whichever worker answers,
    # adds them all up. One per port, so two gateways sharing a data dir keep apart. A directory given in the
    # environment is the operator's to manage.
    given = os.environ.get(MULTIPROC_ENV)
    directory = Path(given) if given else settings.data_dir.resolve() / "prometheus" / f"port-{port}"
    directory.mkdir(parents=True, exist_ok=True)
    # Held by this process (the one that spawns the workers) until it exits, and taken before anything is deleted:
    # a second `serve` started by mistake must not empty the files the running workers write to (they would go on
    # writing to deleted files and /metrics would stay blank until a restart). The kernel drops it on any exit.
    with (directory / SERVING_LOCK).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            where = f"{MULTIPROC_ENV}={directory}" if given else f"this data dir ({settings.data_dir}) on port {port}"
            raise CliError(f"another gateway is serving with {where}") from None
        if not given:
            _empty_metrics_dir(directory)
        # Set before the workers start: prometheus-client picks its storage when first imported.
        os.environ[MULTIPROC_ENV] = str(directory)
        migrate(settings)  # once, before the processes start
        # Each process builds its own app from the same environment (clients, pools, caches are per process).
        uvicorn.run(
            "gateway.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level="info",
            proxy_headers=True,
        )


def gateway_app(settings: Settings) -> FastAPI:
    """The gateway's app, not started yet; raises ConfigurationError when an enabled backend cannot work."""
    from gateway.app import create_app

    return create_app(settings, freeze_gc=True)  # the one app this process serves


def serve_app(app: FastAPI, *, host: str, port: int, when_ready: str | None = None) -> None:
    """Serve ``app`` in this process; print ``when_ready`` once its /readyz answers 200."""
    import uvicorn

    if when_ready is not None:
        # Its own polls are left out of the access log: a line four times a second while the model loads is noise.
        logging.getLogger("uvicorn.access").addFilter(_HideOwnPolls())
        ready_url = f"http://{_loopback(host)}:{port}{OWN_POLL}"
        announce = threading.Thread(target=_print_when_ready, args=(ready_url, when_ready), daemon=True)
        announce.start()
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=True)


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


def _loopback(host: str) -> str:
    """How this machine reaches a server bound to ``host``, as the host part of a URL."""
    reach = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
    return f"[{reach}]" if ":" in reach else reach


# The path the announcing thread polls: /readyz, marked so that its requests can be told from everyone else's.
OWN_POLL = "/readyz?from=launch"


class _HideOwnPolls(logging.Filter):
    """Drops uvicorn's access-log lines for OWN_POLL (their args: client, method, path, HTTP version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (isinstance(args, tuple) and len(args) > 2 and args[2] == OWN_POLL)


def _print_when_ready(ready_url: str, message: str) -> None:
    """Poll ``ready_url`` until it answers 200, then print ``message`` (a thread beside the server)."""
    # urllib rather than httpx, which logs every request at INFO: the wait would fill the log.
    while True:
        try:
            with urllib.request.urlopen(ready_url, timeout=5) as response:  # noqa: S310 (our own http:// URL)
                if response.status == 200:
                    break
        except (OSError, http.client.HTTPException):
            pass  # not listening yet, or not ready (urllib raises HTTPError, an OSError, for a 503)
        time.sleep(0.25)
    print(message, flush=True)


def run_worker(settings: Settings, *, host: str, port: int) -> None:
    """Serve the self-hosted worker protocol on this machine's GPU (or CPU, on the tiny model)."""
    import uvicorn

    from inference.serving import GenerationQueue, model_loader
    from inference.worker import create_worker_app

    build_tiny_model(settings)
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
    uvicorn.run(app, host=host, port=port, log_level="info")
