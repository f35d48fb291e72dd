"""One device, one generation at a time: a worker thread with a bounded queue in front of a runner."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from inference.runner import GenerateParams, Generation, HiDreamRunner

log = logging.getLogger("inference.serving")


class Runner(Protocol):
    def generate(self, params: GenerateParams) -> Generation: ...


class QueueFull(Exception):
    """Every slot is taken; try again in about ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full; retry in {retry_after} s")
        self.retry_after = retry_after


class NotLoaded(Exception):
    """The model failed to load, or the queue has been shut down."""


class GenerationQueue:
    """Loads a runner and runs generations on one worker thread, with at most ``queue_size`` waiting.

    Example::

        queue = GenerationQueue(lambda: HiDreamRunner.load(path), queue_size=8)
        queue.start()
        generation = await queue.submit(params, timeout=120)
    """

    def __init__(self, loader: Callable[[], Runner], *, queue_size: int = 8) -> None:
        self.capacity = 1 + queue_size
        self._loader = loader
        self._executor = self._new_executor()
        self._runner: Future[Runner] | None = None
        self._pending = 0
        self._lock = threading.Lock()
        self._avg_seconds = 5.0

    @staticmethod
    def _new_executor() -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="hidream-gen")

    def start(self) -> None:
        """Begin loading the model on the worker thread; jobs submitted meanwhile wait behind the load.

        After ``close()``, starting again loads afresh (an app restarted in the same process).
        """
        if self._runner is None:
            self._runner = self._executor.submit(self._loader)

    @property
    def pending(self) -> int:
        """Jobs running or waiting."""
        return self._pending

    @property
    def ready(self) -> bool:
        """True once the model has loaded."""
        return self._runner is not None and self._runner.done() and self._runner.exception() is None

    @property
    def load_error(self) -> BaseException | None:
        """Why the model failed to load, if it did."""
        if self._runner is not None and self._runner.done():
            return self._runner.exception()
        return None

    def retry_after(self) -> int:
        """Seconds until a slot is likely to free up: one generation, from recent generation times."""
        return int(self._avg_seconds) + 1

    def _release(self, _fut: object) -> None:
        with self._lock:
            self._pending -= 1

    def _run(self, params: GenerateParams) -> Generation:
        assert self._runner is not None
        gen = self._runner.result().generate(params)  # the load ran first on this same thread
        self._avg_seconds = 0.8 * self._avg_seconds + 0.2 * sum(gen.timings.values())
        return gen

    async def submit(self, params: GenerateParams, *, timeout: float) -> Generation:
        """Run ``params`` when its turn comes; raises QueueFull, NotLoaded or TimeoutError."""
        self.start()
        error = self.load_error
        if error is not None:
            raise NotLoaded(f"the model failed to load: {error}")
        with self._lock:
            if self._pending >= self.capacity:
                raise QueueFull(self.retry_after())
            self._pending += 1
        try:
            fut = self._executor.submit(self._run, params)
        except RuntimeError as exc:  # shut down: the process is stopping
            self._release(None)
            raise NotLoaded("shutting down") from exc
        fut.add_done_callback(self._release)
        # Cancelling the wrapper (timeout, or the caller went away) also drops a job that has not started.
        return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)

    def close(self) -> None:
        """Stop: queued jobs are dropped, a running one finishes in the background."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor, self._runner = self._new_executor(), None


def model_loader(
    model: str, *, cache_dir: Path, llama_path: Path | None = None, device: str | None = None
) -> Callable[[], HiDreamRunner]:
    """A loader for a model setting: ``tiny`` builds (once, under ``cache_dir``) and loads the tiny
    pipeline; anything else is a diffusers HiDream directory, with Llama at ``llama_path`` if separate."""

    def load() -> HiDreamRunner:
        from inference.tiny import build_tiny_pipeline

        if model == "tiny":
            root = build_tiny_pipeline(cache_dir / "tiny")
            runner = HiDreamRunner.load(root / "pipeline", llama_path=root / "llama", device=device)
        else:
            runner = HiDreamRunner.load(model, llama_path=llama_path, device=device)
        log.info("model %s loaded in %.1f s on %s", model, runner.load_seconds, runner.device)
        return runner

    return load
