"""GPU benchmark: HiDream-I1's transformer, stock diffusers against ours, in one run on one card.

Run on a GPU host:   python bench/gpu_bench.py                 (random weights of the released size)
Try it on a CPU:     python bench/gpu_bench.py --tiny --steps 2

Prints, at 1024x1024 (4096 image tokens): ms per transformer step at batch 1 (dev/fast) and batch 2 (full,
classifier-free guidance) for stock diffusers, for ours (device-side MoE), and for ours with regional
torch.compile; model FLOP utilisation; projected seconds of transformer time per image per variant; and
weight-load GB/s for stock (``safetensors.torch.load_file`` shard by shard, as ``from_pretrained`` does)
and ours (inference/loading.py) on the same files on the same disk; peak GPU memory of each path; and the Modal
path (``--no-modal-path`` skips it): the transformer saved as diffusers shards, then, in a fresh process, loaded
into CPU memory in bf16 as ``@modal.enter(snap=True)`` does, moved to the GPU and MoE-patched as ``start`` does,
with each phase's seconds, peak host memory (VmHWM) and peak GPU memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from inference.loading import read_safetensors
from inference.moe import patch_moe
from inference.runner import compile_blocks

RELEASED = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 16,
    "num_single_layers": 32,
    "attention_head_dim": 128,
    "num_attention_heads": 20,
    "caption_channels": [4096, 4096],
    "text_emb_dim": 2048,
    "num_routed_experts": 4,
    "num_activated_experts": 2,
    "axes_dims_rope": [64, 32, 32],
    "max_resolution": [128, 128],
    "llama_layers": list(range(32)) + [31] * 16,
}
TINY = RELEASED | {
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "caption_channels": [32, 32],
    "text_emb_dim": 64,
    "axes_dims_rope": [4, 2, 2],
    "llama_layers": [0, 1, 1],
}
FLOPS_PER_STEP_BATCH1 = 77.8e12  # ../shared/specs/hidream.md, released size, 1024x1024
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks
VAE_DECODE_S = 0.092  # ../shared/specs/hidream.md, H100
STEPS = {"full": (50, 2), "dev": (28, 1), "fast": (16, 1)}


def build(config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """The transformer with random weights, made directly on the device (no 34 GB init on the host)."""
    from diffusers import HiDreamImageTransformer2DModel

    with torch.device("meta"):
        model = HiDreamImageTransformer2DModel(**config).to(dtype)  # free on meta; memory comes in dtype
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def inputs(config: dict[str, Any], batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    side = config["max_resolution"][0]  # latents of a 1024x1024 image: 128x128
    t5, llama = config["caption_channels"]
    return {
        "hidden_states": torch.randn(batch, config["in_channels"], side, side, device=device, dtype=dtype),
        "timesteps": torch.full((batch,), 500.0, device=device),
        "encoder_hidden_states_t5": torch.randn(batch, 128, t5, device=device, dtype=dtype),
        "encoder_hidden_states_llama3": torch.randn(
            max(config["llama_layers"]) + 1, batch, 128, llama, device=device, dtype=dtype
        ),
        "pooled_embeds": torch.randn(batch, config["text_emb_dim"], device=device, dtype=dtype),
        "return_dict": False,
    }


def ms_per_step(model: Any, args: dict[str, Any], steps: int, warmup: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(warmup):
            model(**args)
        sync()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            model(**args)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def load_speed(model: Any, device: torch.device, shard_bytes: int, limit_bytes: int) -> tuple[float, float, int, bool]:
    """GB/s of stock (load_file per shard, in turn) and ours (parallel) on the same shards; True if cold."""
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if total + nbytes > limit_bytes:
            break
        if size + nbytes > shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous().cpu()
        size += nbytes
        total += nbytes
    results = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DISK_DIR")) as tmp:
        files = []
        for i, shard in enumerate(shards):
            files.append(Path(tmp) / f"shard-{i:03d}.safetensors")
            save_file(shard, files[-1])
        del shards
        cold = True
        for loader in ("stock", "ours"):
            cold = drop_page_cache() and cold
            start = time.perf_counter()
            if loader == "stock":
                loaded = {}
                for f in files:
                    loaded.update(load_file(f, device=str(device)))
                if device.type == "cuda":
                    torch.cuda.synchronize()
            else:
                loaded, _ = read_safetensors(files, device)
            results.append(total / (time.perf_counter() - start) / 1e9)
            del loaded
    return results[0], results[1], total, cold


def drop_page_cache() -> bool:
    """Make the next read come from the disk, not memory (needs root); False if not possible."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="a tiny config, to check the script on a CPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--load-gb", type=float, default=8.0, help="bytes of weights for the load test")
    parser.add_argument("--no-modal-path", action="store_true", help="skip the snapshot-then-GPU load")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = TINY if args.tiny else RELEASED
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = next((v for k, v in PEAK_BF16.items() if k in card), None)
    print(f"device: {card}; torch {torch.__version__}; dtype {dtype}; config {'tiny' if args.tiny else 'released'}")

    model = build(config, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    print(f"transformer: {params / 1e9:.2f} B parameters")

    def both_batches() -> dict[int, float]:
        return {
            b: ms_per_step(model, inputs(config, b, device, dtype), args.steps, args.warmup, device) for b in (1, 2)
        }

    saved = tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DISK_DIR"))
    modal_dir: Path | None = None
    if not args.no_modal_path:  # saved now, in the stock layout released checkpoints have (patching shares storage)
        need = sum(p.numel() * p.element_size() for p in model.parameters()) + (int(args.load_gb * 1e9) + (1 << 30))
        if shutil.disk_usage(saved.name).free < need:
            print(f"(Modal path skipped: {need / 1e9:.0f} GB of free disk needed under BENCH_DISK_DIR)")
        else:
            modal_dir = Path(saved.name) / "transformer"
            model.save_pretrained(modal_dir, max_shard_size="5GB")
    peaks: dict[str, float] = {}
    rows = {"stock": both_batches()}
    peaks["stock"] = gpu_peak_gib(device)
    patch_moe(model)  # in place, block by block: the experts' weights are restacked, not duplicated
    rows["ours"] = both_batches()
    peaks["ours"] = gpu_peak_gib(device)
    if not args.no_compile and device.type == "cuda":
        start = time.perf_counter()
        compile_blocks(model)
        rows["ours + regional compile"] = both_batches()
        peaks["ours + regional compile"] = gpu_peak_gib(device)
        print(f"(compile and first runs: {time.perf_counter() - start:.0f} s)")

    print(f"\n{'path':26s} {'b=1 ms/step':>12s} {'b=2 ms/step':>12s} {'MFU b=2':>8s}   full / dev / fast s/image")
    for name, ms in rows.items():
        mfu = f"{2 * FLOPS_PER_STEP_BATCH1 / (ms[2] / 1000) / peak:7.1%}" if peak and not args.tiny else "    n/a"
        proj = [n * ms[b] / 1000 + VAE_DECODE_S for n, b in STEPS.values()]
        print(f"{name:26s} {ms[1]:12.1f} {ms[2]:12.1f} {mfu:>8s}   {proj[0]:.2f} / {proj[1]:.2f} / {proj[2]:.2f}")
    print("(projections: steps x ms/step + VAE decode 92 ms; text encoders not included)")
    if device.type == "cuda":
        print("peak GPU memory, GiB (since the start): " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()))

    stock_gbs, ours_gbs, nbytes, cold = load_speed(
        model, device, shard_bytes=2 << 30, limit_bytes=int(args.load_gb * 1e9)
    )
    state = "cold page cache" if cold else "page cache NOT dropped (warm): run as root for cold figures"
    print(
        f"\nweight load, {nbytes / 1e9:.1f} GB, {state}: stock {stock_gbs:.2f} GB/s, ours {ours_gbs:.2f} GB/s "
        f"({ours_gbs / stock_gbs:.1f}x)"
    )
    if modal_dir is not None:
        del model
        torch._dynamo.reset()  # compiled blocks and patched forwards are reference cycles: collect them
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        modal_path(modal_dir)
    saved.cleanup()


def gpu_peak_gib(device: torch.device) -> float:
    """Peak GPU memory allocated so far, in GiB (0 on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


# The Modal path in a fresh process, so its memory figures are its own.
MODAL_PATH = """
import json, sys, time
import torch
from diffusers import HiDreamImageTransformer2DModel
from inference.loading import load_model
from inference.moe import patch_moe

def status_kib(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))

out = {"baseline_gib": status_kib("VmRSS") / 2**20}
start = time.perf_counter()
model, stats = load_model(HiDreamImageTransformer2DModel, sys.argv[1], device="cpu", dtype=torch.bfloat16)
out["load_s"], out["load_gb"] = time.perf_counter() - start, stats.bytes / 1e9
out["host_peak_after_load_gib"] = status_kib("VmHWM") / 2**20
if torch.cuda.is_available():
    start = time.perf_counter()
    model.to("cuda")
    torch.cuda.synchronize()
    out["move_s"] = time.perf_counter() - start
    start = time.perf_counter()
    patch_moe(model)
    torch.cuda.synchronize()
    out["patch_s"] = time.perf_counter() - start
    out["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["gpu_now_gib"] = torch.cuda.memory_allocated() / 2**30
else:
    start = time.perf_counter()
    patch_moe(model)
    out["patch_s"] = time.perf_counter() - start
out["model_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
out["host_peak_gib"] = status_kib("VmHWM") / 2**20
print(json.dumps(out))
"""


def modal_path(directory: Path) -> None:
    """Load as modal_app's snapshot hook does, then move and patch as its start hook does; print the figures."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", MODAL_PATH, str(directory)],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(root)},
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"Modal path failed:\n{done.stderr[-3000:]}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"\nModal path (snapshot load on the CPU, then move + MoE patch): model {got['model_gib']:.1f} GiB; "
        f"load {got['load_s']:.1f} s ({got['load_gb'] / got['load_s']:.2f} GB/s), host peak "
        f"{got['host_peak_gib'] - got['baseline_gib']:.1f} GiB above a {got['baseline_gib']:.1f} GiB baseline"
    )
    if "move_s" in got:
        print(
            f"move to GPU {got['move_s']:.1f} s, MoE patch {got['patch_s']:.2f} s; GPU peak "
            f"{got['gpu_peak_gib']:.1f} GiB, resident {got['gpu_now_gib']:.1f} GiB"
        )
    else:
        print(f"no GPU: MoE patch on the CPU {got['patch_s']:.2f} s")


if __name__ == "__main__":
    main()
