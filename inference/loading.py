"""Fast weight loading: safetensors shards read in parallel, in large sequential reads, into pinned memory.

Stock ``from_pretrained`` materialises a model and then reads its tensors one by one through mmap. Here the
model is built on the meta device (no memory, no init), every shard is read whole by its own thread into
one (pinned, on CUDA hosts) buffer, copied to the device in one transfer per shard, and the tensors are
views into that: the disk streams at its sequential rate and the copies overlap with the reads.
"""

from __future__ import annotations

import json
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CHUNK = 64 << 20  # 64 MiB reads: large enough to stream, small enough to keep several shards in flight


@dataclass
class LoadStats:
    """What a load moved and how fast."""

    bytes: int
    seconds: float


def _read_shard(path: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], int]:
    """Every tensor of one safetensors file, on ``device``, as views into one buffer."""
    with open(path, "rb", buffering=0) as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header: dict[str, Any] = json.loads(fh.read(header_len))
        header.pop("__metadata__", None)
        size = max((info["data_offsets"][1] for info in header.values()), default=0)
        on_disk = os.fstat(fh.fileno()).st_size - 8 - header_len
        if on_disk < size:
            raise OSError(f"{path} ended after {on_disk} of {size} data bytes (truncated download?)")
        pin = device.type == "cuda"
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        view = memoryview(buf.numpy())
        done = 0
        while done < size:
            got = fh.readinto(view[done : done + CHUNK])
            if not got:
                raise OSError(f"{path} ended after {done} of {size} data bytes")
            done += got
    data = buf.to(device, non_blocking=True) if device.type != "cpu" else buf
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        raw = data[start:end]
        if start % dtype.itemsize:  # a view needs its offset aligned to the element size
            raw = raw.clone()
        tensors[name] = raw.view(dtype).reshape(info["shape"])
    return tensors, size


def read_safetensors(
    files: list[Path], device: torch.device | str, threads: int = 8
) -> tuple[dict[str, torch.Tensor], LoadStats]:
    """All tensors of ``files``, read in parallel onto ``device``."""
    device = torch.device(device)
    start = time.perf_counter()
    state: dict[str, torch.Tensor] = {}
    total = 0
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        for tensors, size in pool.map(lambda f: _read_shard(f, device), files):
            state.update(tensors)
            total += size
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return state, LoadStats(total, time.perf_counter() - start)


def load_model(
    model_cls: Any, directory: Path | str, *, device: torch.device | str, dtype: torch.dtype
) -> tuple[Any, LoadStats]:
    """A diffusers or transformers model from ``directory`` (config plus safetensors shards), fast.

    Example: ``transformer, stats = load_model(HiDreamImageTransformer2DModel, root / "transformer",
    device="cuda", dtype=torch.bfloat16)``.
    """
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {directory}")
    with torch.device("meta"):
        model = model_cls.from_config(model_cls.load_config(directory))
    state, stats = read_safetensors(files, device)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{directory}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if any(p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model, stats
