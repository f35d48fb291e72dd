"""Fast weight loading: safetensors shards read in parallel, in file order, straight to where the weights live.

Stock ``from_pretrained`` materialises a model and then reads its tensors one by one through mmap. Here the
model is built on the meta device (no memory, no init), every shard is read by its own thread, and each
tensor's bytes go once to their final place: the routed experts of every MoE layer into two stacked tensors,
``w13 (experts, 2 x hidden, dim)`` and ``w2 (experts, dim, hidden)``, the layout inference/moe.py adopts
without a copy; every other tensor of a shard into one buffer of its own holding only those. The weights are
therefore held once, during the load and after it, however the model is later patched. On the CPU the bytes
are read straight into place; on CUDA they pass through two small pinned staging buffers per thread, each
piece copied to its place on the device while the next is read. Floating-point tensors stored in another
dtype than the one asked for are converted one at a time as they land, the experts into their stacks all the
same, so a converting load also holds the weights once and patch_moe still adopts the stacks.

Which files: the index's ``weight_map`` when there is an index (exactly the files it names, each tensor from
the file it names), else the one standard weights file. Leftovers and variants (``*.fp16.safetensors``) are
never read unless the index names them.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import FileIO
from math import prod
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
ALIGN = 64  # tensors in a shard's own buffer start 64-byte aligned, so any dtype can view them
INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")  # diffusers, transformers


@dataclass
class LoadStats:
    """What a load moved and how fast."""

    bytes: int
    seconds: float


@dataclass(frozen=True)
class Entry:
    """One tensor in a safetensors file: its bytes within the data section, dtype and shape."""

    name: str
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Shard:
    """One safetensors file: where its data section starts and the tensors to take from it, in file order."""

    path: Path
    data_start: int
    entries: list[Entry]


def weight_files(directory: Path | str) -> dict[Path, set[str] | None]:
    """The safetensors files holding a model's weights, each with the tensors to take from it (None: all)."""
    directory = Path(directory)
    indexes = [directory / name for name in INDEX_NAMES if (directory / name).is_file()]
    if len(indexes) > 1:
        raise ValueError(f"{directory}: several weight indexes ({', '.join(p.name for p in indexes)})")
    if indexes:
        return _indexed_files(indexes[0])
    singles = [directory / name for name in WEIGHTS_NAMES if (directory / name).is_file()]
    if len(singles) == 1:
        return {singles[0]: None}
    present = sorted(p.name for p in directory.glob("*.safetensors"))
    if singles:
        raise ValueError(f"{directory}: both {' and '.join(WEIGHTS_NAMES)} and no index: which holds the weights?")
    if present:  # shards without their index, or only variants: guessing could load a stale file
        raise ValueError(f"{directory}: no {INDEX_NAMES[0]} or {WEIGHTS_NAMES[0]}, only {present}")
    raise FileNotFoundError(f"{directory}: no {INDEX_NAMES[0]} or {WEIGHTS_NAMES[0]}")


def _indexed_files(index: Path) -> dict[Path, set[str] | None]:
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: no weight_map")
    files: dict[Path, set[str]] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file:  # a plain file name, never a path out
            raise ValueError(f"{index}: {file!r} (for {name}) is not a file name")
        files.setdefault(index.parent / file, set()).add(name)
    missing = sorted(p.name for p in files if not p.is_file())
    if missing:
        raise FileNotFoundError(f"{index} names {missing}, not in {index.parent} (incomplete download?)")
    return {path: names for path, names in files.items()}


def read_header(path: Path, names: set[str] | None = None) -> Shard:
    """The tensors of one safetensors file (only ``names`` when given), after checking it is complete."""
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header: dict[str, Any] = json.loads(fh.read(header_len))
        on_disk = os.fstat(fh.fileno()).st_size - 8 - header_len
    header.pop("__metadata__", None)
    size = max((info["data_offsets"][1] for info in header.values()), default=0)
    if on_disk < size:
        raise OSError(f"{path} ended after {on_disk} of {size} data bytes (truncated download?)")
    if names is not None and not names <= header.keys():
        raise ValueError(f"{path} lacks {sorted(names - header.keys())[:5]}, which the index says it holds")
    entries = [
        Entry(name, info["data_offsets"][0], info["data_offsets"][1], DTYPES[info["dtype"]], tuple(info["shape"]))
        for name, info in header.items()
        if names is None or name in names
    ]
    for e in entries:  # a corrupt header must not make one tensor read another's bytes
        if not 0 <= e.start <= e.end or e.end - e.start != _nbytes(e, e.dtype):
            raise ValueError(f"{path}: {e.name} has offsets {e.start}..{e.end} for {e.shape} {e.dtype}")
    return Shard(path, 8 + header_len, sorted(entries, key=lambda e: e.start))


def _target_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    # Floating-point tensors become ``dtype``, as ``model.to(dtype)`` would make them; others keep theirs.
    return dtype if dtype is not None and stored.is_floating_point else stored


def _nbytes(entry: Entry, dtype: torch.dtype) -> int:
    return int(prod(entry.shape) * dtype.itemsize)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, to read a file into."""
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def _read_into(fh: FileIO, offset: int, view: memoryview) -> None:
    fh.seek(offset)
    done = 0
    while done < len(view):
        got = fh.readinto(view[done : done + CHUNK])
        if not got:
            raise OSError(f"{fh.name} ended after {offset + done} bytes")
        done += got


def _read_shard(
    shard: Shard, device: torch.device, dtype: torch.dtype | None, placed: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The tensors of one shard on ``device``: those in ``placed`` read into place, the rest into one buffer."""
    rest = [e for e in shard.entries if e.name not in placed]
    offsets, size = [], 0
    for e in rest:
        offsets.append(size)
        size += -(-_nbytes(e, _target_dtype(e.dtype, dtype)) // ALIGN) * ALIGN
    buf = torch.empty(size, dtype=torch.uint8, device=device)
    dest = {e.name: placed[e.name] for e in shard.entries if e.name in placed}
    for e, off in zip(rest, offsets, strict=True):
        target = _target_dtype(e.dtype, dtype)
        dest[e.name] = buf[off : off + _nbytes(e, target)].view(target).reshape(e.shape)
    with open(shard.path, "rb", buffering=0) as fh:
        if device.type == "cpu":
            for e in shard.entries:
                _read_cpu(fh, shard.data_start, e, dest[e.name])
        elif shard.entries:
            _read_staged(fh, shard.data_start, shard.entries, dest, pin=device.type == "cuda")
    return {e.name: dest[e.name] for e in shard.entries}


def _read_cpu(fh: FileIO, data_start: int, e: Entry, out: torch.Tensor) -> None:
    if e.end == e.start:
        return
    if out.dtype == e.dtype:  # straight from the file into place
        _read_into(fh, data_start + e.start, _bytes_of(out))
    else:  # converted as it lands; the transient is this one tensor
        raw = torch.empty(e.end - e.start, dtype=torch.uint8)
        _read_into(fh, data_start + e.start, _bytes_of(raw))
        out.copy_(raw.view(e.dtype).reshape(e.shape))


def _read_staged(
    fh: FileIO,
    data_start: int,
    entries: list[Entry],
    dest: Mapping[str, torch.Tensor],
    *,
    pin: bool,
    stage_bytes: int = CHUNK,
) -> None:
    """Read tensors into device memory through two reusable (pinned, on CUDA) staging buffers.

    A piece is read into one buffer while the previous piece's copy to the device runs from the other; a buffer
    is refilled only once its copy has finished. Host memory held: two buffers per thread, whatever the shard's
    size (pinning a whole shard would pin, and PyTorch's host allocator would keep, several GB per thread).
    """
    buffers = [torch.empty(stage_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
    copied: list[Any] = [None, None]  # the CUDA event after each buffer's last copy
    turn = 0
    for e in entries:
        out, size = dest[e.name], e.end - e.start
        if size == 0:
            continue
        if out.dtype != e.dtype:  # converted as it lands: the transient is this one tensor, in pageable memory
            raw = torch.empty(size, dtype=torch.uint8)
            _read_into(fh, data_start + e.start, _bytes_of(raw))
            out.copy_(raw.view(e.dtype).reshape(e.shape))
            continue
        out_bytes = out.view(-1).view(torch.uint8)
        for pos in range(0, size, stage_bytes):
            piece = min(stage_bytes, size - pos)
            buf, event = buffers[turn], copied[turn]
            if event is not None:
                event.synchronize()  # this buffer's previous copy has left it
            _read_into(fh, data_start + e.start + pos, _bytes_of(buf[:piece]))
            out_bytes[pos : pos + piece].copy_(buf[:piece], non_blocking=pin)
            if pin:
                copied[turn] = torch.cuda.Event()
                copied[turn].record(torch.cuda.current_stream(out.device))
            turn = 1 - turn
    for event in copied:
        if event is not None:
            event.synchronize()


def _read_all(
    shards: list[Shard],
    device: torch.device,
    dtype: torch.dtype | None,
    placed: Mapping[str, torch.Tensor],
    threads: int,
) -> tuple[dict[str, torch.Tensor], LoadStats]:
    seen: dict[str, Path] = {}
    for shard in shards:
        for e in shard.entries:
            if seen.setdefault(e.name, shard.path) != shard.path:
                raise ValueError(f"{e.name} is in both {seen[e.name]} and {shard.path}")
    start = time.perf_counter()
    state: dict[str, torch.Tensor] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
        for tensors in pool.map(lambda s: _read_shard(s, device, dtype, placed), shards):
            state.update(tensors)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch._C._host_emptyCache()  # give the staging buffers' pinned memory back to the system
    nbytes = sum(e.end - e.start for shard in shards for e in shard.entries)
    return state, LoadStats(nbytes, time.perf_counter() - start)


def read_safetensors(
    files: list[Path], device: torch.device | str, threads: int = 8
) -> tuple[dict[str, torch.Tensor], LoadStats]:
    """All tensors of ``files``, read in parallel onto ``device``."""
    return _read_all([read_header(f) for f in files], torch.device(device), None, {}, threads)


def _stacked_experts(
    model: nn.Module, entries: Mapping[str, Entry], device: torch.device, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Places for the routed experts' weights: views into one ``w13`` and one ``w2`` stack per MoE layer."""
    placed: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        if type(module).__name__ != "MOEFeedForwardSwiGLU":  # diffusers' HiDream MoE layer, as inference/moe.py
            continue
        hidden, dim = module.experts[0].w1.weight.shape
        at = f"{prefix}.experts" if prefix else "experts"
        names = [[f"{at}.{i}.{w}.weight" for w in ("w1", "w3", "w2")] for i in range(len(module.experts))]
        stored = [entries.get(name) for row in names for name in row]
        dtypes = {e.dtype for e in stored if e is not None}
        expected = [(hidden, dim), (hidden, dim), (dim, hidden)] * len(names)
        if [e.shape if e else None for e in stored] != expected or len(dtypes) != 1:
            continue  # not the layout we stack: loaded like any other tensor, and load_state_dict judges it
        target = _target_dtype(dtypes.pop(), dtype)
        # In the dtype the weights end in, so patch_moe can adopt the stacks as they are.
        w13 = torch.empty(len(names), 2 * hidden, dim, dtype=target, device=device)
        w2 = torch.empty(len(names), dim, hidden, dtype=target, device=device)
        for i, (w1_name, w3_name, w2_name) in enumerate(names):
            placed[w1_name], placed[w3_name], placed[w2_name] = w13[i, :hidden], w13[i, hidden:], w2[i]
    return placed


def load_model(
    model_cls: Any, directory: Path | str, *, device: torch.device | str, dtype: torch.dtype, threads: int = 8
) -> tuple[Any, LoadStats]:
    """A diffusers model from ``directory`` (config plus safetensors weights), fast and held once in memory.

    Floating-point weights are converted to ``dtype`` as they are read. Example: ``transformer, stats =
    load_model(HiDreamImageTransformer2DModel, root / "transformer", device="cuda", dtype=torch.bfloat16)``.
    """
    directory, device = Path(directory), torch.device(device)
    shards = [read_header(path, names) for path, names in weight_files(directory).items()]
    with torch.device("meta"):
        model = model_cls.from_config(model_cls.load_config(directory))
    entries = {e.name: e for shard in shards for e in shard.entries}
    placed = _stacked_experts(model, entries, device, dtype)
    state, stats = _read_all(shards, device, dtype, placed, threads)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{directory}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # e.g. buffers made in __init__ and not saved: nothing here gives them values
        raise ValueError(f"{directory}: {left[:5]} have no weights in the files")
    model.eval()
    model.requires_grad_(False)
    return model, stats
