"""Start-up: the warm-up compiles every shape class a tenant can reach, and the cold-start bench runs."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._dynamo.exc
from torch._dynamo.utils import counters

from inference import startup
from inference.runner import GenerateParams, HiDreamRunner, compile_blocks, warm_up
from inference.variants import VARIANTS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def compiled_runner(tiny_root: Path) -> Iterator[HiDreamRunner]:
    """A runner of its own (compiling changes the transformer in place), its blocks compiled by dynamo.

    The "eager" backend traces and guards exactly as inductor does but runs the captured graphs as they are,
    so recompiles show up on the CPU in seconds; inductor's kernels need a GPU to be worth anything.
    """
    runner = startup.load(tiny_root / "pipeline", llama_dir=tiny_root / "llama", device="cpu", dtype=torch.float32)
    startup.bring_up(runner, VARIANTS["fast"], compile_mode="none", require_gpu=False)
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(runner.pipe.transformer, backend="eager")
    try:
        yield runner
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()


def test_warm_up_leaves_nothing_to_compile_for_tenants(compiled_runner: HiDreamRunner) -> None:
    warm_up(compiled_runner, VARIANTS["fast"])
    # Each block is one whole graph: no graph breaks (a break runs eagerly between graphs, and on a GPU the
    # MoE's bincount used to read back to the host there), one graph per block kind and shape class.
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.config.error_on_recompile = True  # from here on, any compile raises
    # Other resolutions, n up to 4, guidance doubling the batch (to 8), and the other variants' schedulers.
    for width, height, n, guidance, variant in (
        (1360, 768, 1, None, "fast"),
        (832, 1248, 3, None, "dev"),
        (1024, 1024, 4, 5.0, "full"),
        (880, 1168, 2, 5.0, "full"),
        (1024, 1024, 1, 5.0, "full"),
    ):
        params = GenerateParams.of(
            prompt="a fox", variant=variant, width=width, height=height, seed=1, n=n,
            num_inference_steps=1, guidance_scale=guidance,
        )  # fmt: skip
        assert len(compiled_runner.generate(params).images) == n


def test_an_unwarmed_shape_would_compile(compiled_runner: HiDreamRunner) -> None:
    """The check above can fail: without the warm-up, the first request compiles."""
    torch._dynamo.config.error_on_recompile = True
    with pytest.raises(torch._dynamo.exc.RecompileError):
        compiled_runner.generate(GenerateParams("x", VARIANTS["fast"], 1024, 1024, seed=0, n=1, num_inference_steps=1))
        compiled_runner.generate(GenerateParams("x", VARIANTS["fast"], 1024, 1024, seed=0, n=3, num_inference_steps=1))


def test_cold_start_bench_runs_on_the_cpu() -> None:
    out = subprocess.run(
        [sys.executable, "bench/cold_start.py", "--compile", "none"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert "load" in out and "skipped (in the snapshot)" in out and "MoE restack" in out
    assert "host memory peak" in out
