"""The ``local`` backend: the HiDream runner in this process, one generation at a time, bounded queue."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.backends.base import ImageJob, ImageResult, Probe
from gateway.errors import BackendBusy, BackendFailed, BackendUnavailable, GenerationTimeout
from inference.runner import GenerateParams
from inference.serving import GenerationQueue, NotLoaded, QueueFull

if TYPE_CHECKING:
    from inference.runner import HiDreamRunner

log = logging.getLogger("hidream_gateway.local")

# Runners that have generated once. A runner several backends share (an app restarted in one process, the tests'
# session runner) needs warming only the first time.
_WARM: weakref.WeakSet[Any] = weakref.WeakSet()


def warm_up(runner: HiDreamRunner, *, variant: str) -> None:
    """One small generation (one step, one image), so the first real request does not pay for first-call set-up.

    The first call through a freshly loaded pipeline initialises what later calls reuse (CUDA kernels and
    workspaces, the text encoders' and the VAE's first passes, the image encoder); a failure is only logged: the
    model loaded, and a real request reports its own error.
    """
    if runner in _WARM:
        return
    started = time.perf_counter()
    params = GenerateParams.of(
        variant=variant, prompt="warm-up", width=1024, height=1024, seed=0, num_inference_steps=1
    )
    try:
        runner.generate(params)
    except Exception:
        log.warning("the warm-up generation failed; serving anyway", exc_info=True)
        return
    _WARM.add(runner)
    log.info("local model warmed up in %.1f s", time.perf_counter() - started)


class LocalBackend:
    """Runs jobs on a HiDreamRunner in this process: one generation at a time, a bounded queue.

    Past ``queue_size`` waiting jobs, ``generate`` raises BackendBusy with a Retry-After estimated from
    recent generation times. The loader thread warms the model up (``warm_up``) before the backend is ready.

    Example::

        backend = LocalBackend(lambda: HiDreamRunner.load(path), variants=frozenset({"fast"}))
        backend.start()  # loads the model in the worker thread
        result = await backend.generate(job, timeout=120)
    """

    name = "local"
    kind = "local"

    def __init__(self, loader: Callable[[], HiDreamRunner], *, variants: frozenset[str], queue_size: int = 8) -> None:
        self.variants = variants
        self._loader = loader
        self.queue = GenerationQueue(self._load_and_warm, queue_size=queue_size)

    def _load_and_warm(self) -> HiDreamRunner:
        runner = self._loader()
        # A variant only picks the scheduler, and every runner has them all: the warm-up runs one step anyway.
        warm_up(runner, variant="fast")
        return runner

    def start(self) -> None:
        """Begin loading the model."""
        self.queue.start()

    @property
    def capacity(self) -> int:
        """Jobs it takes at once: the running one and the queue."""
        return self.queue.capacity

    @property
    def pending(self) -> int:
        """Jobs running or queued."""
        return self.queue.pending

    async def probe(self) -> Probe:
        """``up`` once the model has loaded and warmed up, ``loading`` until then, ``down`` if the load failed."""
        if self.queue.ready:
            return Probe("up")
        error = self.queue.load_error
        if error is not None:
            return Probe("down", f"The local model is not available: the model failed to load: {error}"[:300])
        return Probe("loading")

    async def ready(self) -> bool:
        """True once the model has loaded and warmed up."""
        return self.queue.ready

    async def generate(self, job: ImageJob, *, timeout: float) -> ImageResult:
        """Queue the job on the worker thread and wait for it, at most ``timeout`` seconds."""
        try:
            gen = await self.queue.submit(GenerateParams.of(**job.as_dict()), timeout=timeout)
        except QueueFull as exc:
            raise BackendBusy("The local backend's queue is full; retry later.", retry_after=exc.retry_after) from exc
        except NotLoaded as exc:
            raise BackendUnavailable(f"The local model is not available: {exc}") from exc
        except TimeoutError as exc:
            raise GenerationTimeout(f"The generation did not finish within {timeout:.0f} s.") from exc
        except Exception as exc:
            log.exception("local generation failed")
            raise BackendFailed(f"The local backend failed: {type(exc).__name__}") from exc
        return ImageResult(gen.images, gen.content_type, gen.width, gen.height, gen.seed, gen.timings)

    async def aclose(self) -> None:
        """Stop accepting jobs; queued ones are dropped, a running one finishes in the background."""
        self.queue.close()
