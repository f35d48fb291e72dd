"""A GPU worker's cold start, phase by phase, the way modal_app.py runs it.

Run: .venv/bin/python bench/cold_start.py [--model tiny|/weights/fast --llama /weights/llama] [--variant fast]
     [--compile regional|none] [--snapshot cpu|gpu]

``--snapshot cpu`` (Modal's default): load into CPU memory without touching CUDA (what the memory snapshot
captures), then after the "restore" move to the GPU, restack the MoE experts, compile and warm up.
``--snapshot gpu``: load straight to the GPU and do everything before the snapshot. Either way the script
prints each phase, whether a restored container still pays for it, and the resident host memory and GPU memory
at the end. Image pull and snapshot restore happen inside Modal and are not measured here. On a CPU-only machine
(``--model tiny``) the figures only show the shape of the start-up, not an H100's numbers.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from inference import startup
from inference.variants import VARIANTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny", help="'tiny' (built in a temp dir) or a HiDream directory")
    parser.add_argument("--llama", type=Path, default=None, help="Llama directory, when kept apart")
    parser.add_argument("--variant", default="fast", choices=sorted(VARIANTS))
    parser.add_argument("--compile", default="regional", choices=["regional", "none"])
    parser.add_argument("--snapshot", default="cpu", choices=["cpu", "gpu"])
    args = parser.parse_args()

    started = time.perf_counter()
    import torch

    imports = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        model, llama = Path(args.model), args.llama
        if args.model == "tiny":
            from inference.tiny import build_tiny_pipeline

            root = build_tiny_pipeline(Path(tmp) / "tiny")
            model, llama = root / "pipeline", root / "llama"
        times = startup.StartupTimes({"import torch": imports})
        device = "cuda" if args.snapshot == "gpu" else "cpu"
        runner = startup.load(model, llama_dir=llama, device=device, times=times)
        snapshot_after = len(times.phases)
        startup.bring_up(runner, VARIANTS[args.variant], compile_mode=args.compile, require_gpu=False, times=times)
        if args.snapshot == "gpu":
            snapshot_after = len(times.phases)

    card = torch.cuda.get_device_name() if runner.device.startswith("cuda") else platform.processor() or "CPU"
    print(f"device: {card} ({runner.device}); torch {torch.__version__}; model {args.model}; {args.snapshot} snapshot")
    print(f"\n{'phase':34s} {'seconds':>8s}   restored container")
    for i, (phase, seconds) in enumerate(times.phases.items()):
        print(f"{phase:34s} {seconds:8.2f}   {'skipped (in the snapshot)' if i < snapshot_after else 'pays it'}")
    paid = sum(s for i, s in enumerate(times.phases.values()) if i >= snapshot_after)
    print(f"{'after restore, total':34s} {paid:8.2f}")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gpu = f"; GPU memory peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if runner.device != "cpu" else ""
    print(f"\nhost memory peak {peak_rss:.2f} GiB{gpu}")


if __name__ == "__main__":
    main()
