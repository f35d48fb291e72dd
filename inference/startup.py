"""A GPU worker's start-up in two halves, so that a memory snapshot can sit between them (Modal).

``load``: read the weights into memory. Before a CPU memory snapshot no GPU is attached, and this half must
not touch CUDA at all: torch asks the driver for the device count once and remembers the answer, so a count
of 0 taken before the snapshot would keep every restored container on the CPU. ``bring_up``: after the
restore (or straight after ``load`` where nothing is snapshotted), move to the GPU, switch on the
device-side MoE, compile the transformer blocks and warm up every shape class a tenant can reach.
Both halves time their phases, so a cold start can be read phase by phase in the log.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from inference.runner import HiDreamRunner, compile_blocks, warm_up
from inference.variants import Variant

log = logging.getLogger("inference.startup")

CompileMode = Literal["regional", "none"]


@dataclass
class StartupTimes:
    """Seconds spent in each start-up phase, in order."""

    phases: dict[str, float] = field(default_factory=dict)

    def record(self, phase: str, since: float) -> float:
        """Note ``phase`` as having run from ``since`` until now; returns now."""
        now = time.perf_counter()
        self.phases[phase] = now - since
        return now

    def summary(self) -> str:
        """One log line: ``load 12.3 s, move 4.5 s, ...``."""
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items())


# Library caches of "is there a GPU" taken while the answer was hidden; cleared once CUDA may be asked.
_DEVICE_CACHES = (
    ("diffusers.utils.torch_utils", "TorchDeviceBackend._detect_device_type"),
    ("transformers.utils.import_utils", "is_torch_cuda_available"),
)


@contextlib.contextmanager
def cuda_unasked() -> Iterator[None]:
    """Answer "no GPU" to every CUDA query in this block without asking the driver.

    Libraries ask on import (diffusers picks a module-level default device through ``torch.accelerator``,
    which calls ``torch.cuda.is_available``), and the driver's device count is cached by c10 for the life of the
    process: asked before a CPU memory snapshot, with no GPU attached, it stays 0 in every restored container.
    The answers given here are not cached by torch, and the libraries' caches of them are cleared on the way out.
    """
    import torch

    # Its class body keeps a reference to torch.cuda.device_count: import it first, so it keeps the real one.
    import torch._dynamo.device_interface

    saved = {name: getattr(torch.cuda, name) for name in ("is_available", "device_count")}
    driver_count = getattr(torch._C, "_cuda_getDeviceCount", None)  # absent from CPU builds
    torch.cuda.is_available = lambda: False
    torch.cuda.device_count = lambda: 0
    if driver_count is not None:
        torch._C._cuda_getDeviceCount = lambda: 0
    try:
        yield
    finally:
        for name, real in saved.items():
            setattr(torch.cuda, name, real)
        if driver_count is not None:
            torch._C._cuda_getDeviceCount = driver_count
        for module, path in _DEVICE_CACHES:
            _clear_cache(module, path)


def _clear_cache(module: str, path: str) -> None:
    """``cache_clear()`` the lru_cache at ``module.path``, if that library is loaded and has it."""
    target: object = sys.modules.get(module)
    for part in path.split("."):
        target = getattr(target, part, None)
    clear = getattr(target, "cache_clear", None)
    if callable(clear):
        clear()


def load(
    model_dir: Path,
    *,
    llama_dir: Path | None,
    device: str,
    dtype: object = None,
    times: StartupTimes | None = None,
) -> HiDreamRunner:
    """The pipeline on ``device`` ("cpu" before a CPU memory snapshot, with CUDA never asked), device-side MoE
    not yet switched on.

    The MoE restack waits for ``bring_up``: its stacked weights must be made where they will live, and
    moving a module copies every parameter on its own, which would separate the views from their stack.
    """
    import torch

    start = time.perf_counter()
    hidden = device == "cpu"  # loading for a CPU snapshot (or on a CPU host): CUDA must not be asked
    with cuda_unasked() if hidden else contextlib.nullcontext():
        for module in ("diffusers", "transformers"):  # what imports here is in the snapshot, not paid again
            importlib.import_module(module)
        runner = HiDreamRunner.load(
            model_dir,
            llama_path=llama_dir,
            device=device,
            dtype=dtype or torch.bfloat16,  # the released dtype, on the CPU too: the snapshot holds what the GPU gets
            fast_moe=False,
        )
    if times is not None:
        times.record("load", start)
    return runner


def bring_up(
    runner: HiDreamRunner,
    variant: Variant,
    *,
    compile_mode: CompileMode,
    require_gpu: bool,
    times: StartupTimes | None = None,
) -> StartupTimes:
    """Move to the GPU (if the runner is not there yet), restack the MoE experts, compile and warm up.

    ``require_gpu``: a GPU deployment with no GPU visible is a broken container, not a slow one; fail loudly.
    """
    import torch

    from inference.moe import patch_moe

    times = times or StartupTimes()
    now = time.perf_counter()
    if not runner.device.startswith("cuda"):
        if torch.cuda.is_available():  # the first CUDA call of a restored process: the count is fresh
            runner.to("cuda")
            now = times.record("move to GPU", now)
        elif require_gpu:
            raise RuntimeError("no GPU is visible in this container; HiDream needs one (check the gpu= setting)")
    patch_moe(runner.pipe.transformer)
    now = times.record("MoE restack", now)
    # Inductor needs a GPU for its kernels; on the CPU (tests, laptops) the blocks stay eager and unwarmed.
    if runner.device.startswith("cuda"):
        if compile_mode == "regional":
            compile_blocks(runner.pipe.transformer)
        # Compiles (or loads compiled kernels from the cache) and initialises CUDA libraries now, not on a
        # tenant's request.
        warm_up(runner, variant)
        now = times.record("warm-up", now)
    log.info("start-up: %s", times.summary())
    return times
