"""The ``local`` backend: the HiDream runner in this process, one generation at a time, bounded queue."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.backends.base import ImageJob, ImageResult
from gateway.errors import BackendBusy, BackendFailed, BackendUnavailable, GenerationTimeout

if TYPE_CHECKING:
    from inference.runner import HiDreamRunner

log = logging.getLogger("hidream_gateway.local")


class LocalBackend:
    """Runs jobs on a HiDreamRunner in a single worker thread (one device, one generation at a time).

    Up to ``queue_size`` jobs wait behind the running one; past that, ``generate`` raises BackendBusy
    with a Retry-After estimated from recent generation times.

    Example::

        backend = LocalBackend(lambda: HiDreamRunner.load(path), variants={"fast"})
        backend.start()  # loads the model in the worker thread
        result = await backend.generate(job, timeout=120)
    """

    name = "local"

    def __init__(self, loader: Callable[[], HiDreamRunner], *, variants: frozenset[str], queue_size: int = 8) -> None:
        self.variants = variants
        self.capacity = 1 + queue_size
        self._loader = loader
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hdg-local")
        self._runner: Future[HiDreamRunner] | None = None
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._avg_seconds = 5.0

    def start(self) -> None:
        """Begin loading the model; jobs submitted meanwhile queue behind the load."""
        if self._runner is None:
            self._runner = self._executor.submit(self._loader)

    @property
    def pending(self) -> int:
        """Jobs running or queued."""
        return self._pending

    async def ready(self) -> bool:
        """True once the model has loaded."""
        return self._runner is not None and self._runner.done() and self._runner.exception() is None

    def _release(self, _fut: object) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _run(self, job: ImageJob) -> ImageResult:
        from inference.runner import GenerateParams
        from inference.variants import VARIANTS

        assert self._runner is not None
        runner = self._runner.result()  # already done: the load ran first on this thread
        gen = runner.generate(
            GenerateParams(
                prompt=job.prompt,
                variant=VARIANTS[job.variant],
                width=job.width,
                height=job.height,
                seed=job.seed,
                n=job.n,
                negative_prompt=job.negative_prompt,
                num_inference_steps=job.num_inference_steps,
                guidance_scale=job.guidance_scale,
                output_format=job.output_format,
                quality=job.quality,
            )
        )
        seconds = sum(gen.timings.values())
        self._avg_seconds = 0.8 * self._avg_seconds + 0.2 * seconds
        return ImageResult(gen.images, gen.content_type, gen.width, gen.height, gen.seed, gen.timings)

    async def generate(self, job: ImageJob, *, timeout: float) -> ImageResult:
        """Queue the job on the worker thread and wait for it, at most ``timeout`` seconds."""
        self.start()
        assert self._runner is not None
        if self._runner.done() and self._runner.exception() is not None:
            raise BackendUnavailable(f"The local model failed to load: {self._runner.exception()}")
        with self._pending_lock:
            if self._pending >= self.capacity:
                retry = int(self._pending * self._avg_seconds) + 1
                raise BackendBusy("The local backend's queue is full; retry later.", retry_after=retry)
            self._pending += 1
        try:
            fut = self._executor.submit(self._run, job)
        except RuntimeError as exc:  # executor shut down: the app is stopping
            self._release(None)
            raise BackendUnavailable("The local backend is shutting down.") from exc
        fut.add_done_callback(self._release)
        try:
            # Cancelling the wrapper (timeout or client gone) also removes a job that has not started.
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        except TimeoutError as exc:
            raise GenerationTimeout(f"The generation did not finish within {timeout:.0f} s.") from exc
        except (BackendBusy, BackendUnavailable, GenerationTimeout):
            raise
        except Exception as exc:
            log.exception("local generation failed")
            raise BackendFailed(f"The local backend failed: {type(exc).__name__}") from exc

    async def aclose(self) -> None:
        """Stop accepting jobs; queued ones are dropped, a running one finishes in the background."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def local_loader(
    model: str, *, models_dir: Path, llama_path: Path | None, device: str | None
) -> Callable[[], HiDreamRunner]:
    """A loader for HDG_LOCAL_MODEL: ``tiny`` builds (once) and loads the tiny pipeline; else a path."""

    def load() -> HiDreamRunner:
        from inference.runner import HiDreamRunner
        from inference.tiny import build_tiny_pipeline

        if model == "tiny":
            root = build_tiny_pipeline(models_dir / "tiny")
            runner = HiDreamRunner.load(root / "pipeline", llama_path=root / "llama", device=device)
        else:
            runner = HiDreamRunner.load(model, llama_path=llama_path, device=device)
        log.info("local model %s loaded in %.1f s on %s", model, runner.load_seconds, runner.device)
        return runner

    return load
