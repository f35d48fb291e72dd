"""The parallel safetensors loader gives exactly the tensors stock loading gives."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import HiDreamImageTransformer2DModel
from PIL import Image
from safetensors.torch import load_file, save_file

from inference.loading import _read_staged, load_model, read_header, read_safetensors, weight_files
from inference.moe import patch_moe
from inference.runner import GenerateParams, HiDreamRunner
from inference.variants import VARIANTS

INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _same_as_stock(ours: torch.nn.Module, stock: torch.nn.Module) -> bool:
    a, b = ours.state_dict(), stock.state_dict()
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _load(directory: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model, _ = load_model(HiDreamImageTransformer2DModel, directory, device="cpu", dtype=dtype)
    return model


@pytest.fixture
def stock(tiny_root: Path) -> torch.nn.Module:
    return HiDreamImageTransformer2DModel.from_pretrained(tiny_root / "pipeline" / "transformer")


@pytest.fixture
def sharded(tmp_path: Path, stock: torch.nn.Module) -> Path:
    """The tiny transformer saved as diffusers saves a large one: several shards and an index."""
    stock.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) >= 3
    return tmp_path / "sharded"


def test_transformer_loads_identically_to_from_pretrained(tiny_root: Path, stock: torch.nn.Module) -> None:
    directory = tiny_root / "pipeline" / "transformer"
    ours, stats = load_model(HiDreamImageTransformer2DModel, directory, device="cpu", dtype=torch.float32)
    assert _same_as_stock(ours, stock)
    assert stats.bytes == sum(f.stat().st_size for f in directory.glob("*.safetensors")) - _headers(directory)
    assert not any(p.device.type == "meta" for p in ours.parameters())


def _headers(directory: Path) -> int:
    total = 0
    for f in directory.glob("*.safetensors"):
        with open(f, "rb") as fh:
            total += 8 + int.from_bytes(fh.read(8), "little")
    return total


def test_several_shards_mixed_dtypes_and_odd_offsets(tmp_path: Path) -> None:
    tensors = {
        "a": torch.arange(3, dtype=torch.uint8),  # 3 bytes: what follows starts at an odd offset
        "b": torch.randn(5, 7, dtype=torch.float32),
        "c": torch.randn(4, dtype=torch.bfloat16),
    }
    save_file(tensors, tmp_path / "one.safetensors")
    save_file({"d": torch.tensor([True, False]), "e": torch.randn(2, 3).half()}, tmp_path / "two.safetensors")
    state, _ = read_safetensors(sorted(tmp_path.glob("*.safetensors")), "cpu", threads=2)
    assert set(state) == {"a", "b", "c", "d", "e"}
    for name, t in tensors.items():
        assert torch.equal(state[name], t)
    assert state["d"].tolist() == [True, False]


def test_truncated_shard_is_an_error(tmp_path: Path) -> None:
    save_file({"w": torch.randn(64, 64)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[:-100])
    with pytest.raises(OSError, match="ended after"):
        read_safetensors([tmp_path / "w.safetensors"], "cpu")


def test_optimised_runner_makes_the_same_image_as_stock(tiny_root: Path, runner: HiDreamRunner) -> None:
    stock = HiDreamRunner.load(tiny_root / "pipeline", llama_path=tiny_root / "llama", fast_moe=False, fast_load=False)
    params = GenerateParams("a lighthouse", VARIANTS["full"], 1024, 1024, seed=2, num_inference_steps=3)
    ours_px = np.asarray(Image.open(io.BytesIO(runner.generate(params).images[0])), dtype=np.int16)
    stock_px = np.asarray(Image.open(io.BytesIO(stock.generate(params).images[0])), dtype=np.int16)
    # fp32 on the CPU: the two MoE paths sum in a different order, a rounding step at most per channel.
    assert np.abs(ours_px - stock_px).max() <= 1


def test_sharded_model_loads_identically_and_its_experts_are_adopted(sharded: Path, stock: torch.nn.Module) -> None:
    ours = _load(sharded)
    assert _same_as_stock(ours, stock)
    layer = ours.single_stream_blocks[0].block.ff_i
    first = layer.experts[0].w1.weight.data_ptr()
    assert patch_moe(ours) == 2
    # The loader read the experts into the stacked layout: patch_moe uses that memory as it is.
    assert layer._grouped.w13.data_ptr() == first
    assert layer.experts[3].w2.weight.untyped_storage().data_ptr() == layer._grouped.w2.untyped_storage().data_ptr()


def test_weights_are_converted_to_the_asked_dtype_as_they_load(sharded: Path, stock: torch.nn.Module) -> None:
    ours = _load(sharded, torch.bfloat16)
    assert _same_as_stock(ours, stock.to(torch.bfloat16))
    layer = ours.double_stream_blocks[0].block.ff_i
    first = layer.experts[0].w1.weight.data_ptr()
    patch_moe(ours)
    assert layer._grouped.w13.dtype == torch.bfloat16 and layer._grouped.w13.data_ptr() == first


def test_a_leftover_shard_is_not_loaded(sharded: Path, tiny_root: Path, stock: torch.nn.Module) -> None:
    # Stale files from an older download: every tensor zeroed, and one the model does not have.
    stale = {k: torch.zeros_like(v) for k, v in stock.state_dict().items()} | {"stale": torch.ones(3)}
    save_file(stale, sharded / "diffusion_pytorch_model-00009-of-00009.safetensors")
    assert _same_as_stock(_load(sharded), stock)
    single = tiny_root / "pipeline" / "transformer"
    copy = sharded.parent / "single"
    copy.mkdir()
    for f in single.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    save_file(stale, copy / "zzz-leftover.safetensors")
    save_file({k: v.half() for k, v in stale.items()}, copy / "diffusion_pytorch_model.fp16.safetensors")
    assert _same_as_stock(_load(copy), stock)


def test_each_tensor_comes_from_the_file_the_index_names(sharded: Path, stock: torch.nn.Module) -> None:
    weight_map = json.loads((sharded / INDEX).read_text())["weight_map"]
    name = "double_stream_blocks.0.block.ff_i.experts.2.w3.weight"
    other = max(weight_map.values())
    assert other > weight_map[name]  # sorted after the right file: "the last file read wins" would pick it
    tensors = load_file(sharded / other) | {name: torch.zeros_like(stock.state_dict()[name])}
    save_file(tensors, sharded / other)  # a second, wrong copy of `name` in a file the index does not name for it
    assert _same_as_stock(_load(sharded), stock)


def test_an_index_naming_a_missing_file_is_an_error(sharded: Path) -> None:
    weight_map = json.loads((sharded / INDEX).read_text())["weight_map"]
    (sharded / sorted(set(weight_map.values()))[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=r"names \['diffusion_pytorch_model-0000"):
        _load(sharded)


def test_an_index_naming_a_tensor_its_file_lacks_is_an_error(sharded: Path) -> None:
    index = json.loads((sharded / INDEX).read_text())
    index["weight_map"]["x_embedder.proj.weight"] = sorted(set(index["weight_map"].values()))[-1]
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lacks"):
        _load(sharded)


def test_which_files_hold_the_weights(tmp_path: Path, sharded: Path) -> None:
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")  # transformers' name
    save_file({"w": torch.ones(2)}, tmp_path / "model.fp16.safetensors")
    assert weight_files(tmp_path) == {tmp_path / "model.safetensors": None}
    indexed = weight_files(sharded)
    assert {p.name for p in indexed} == set(json.loads((sharded / INDEX).read_text())["weight_map"].values())
    assert all(names for names in indexed.values())


def test_unclear_or_absent_weights_are_errors(tmp_path: Path, sharded: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model"):
        weight_files(tmp_path)
    save_file({"w": torch.ones(2)}, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(ValueError, match=r"only \['diffusion_pytorch_model.fp16.safetensors'\]"):
        weight_files(tmp_path)  # a variant alone is not loaded unless asked for by an index
    save_file({"w": torch.ones(2)}, tmp_path / "diffusion_pytorch_model.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="both"):
        weight_files(tmp_path)
    (sharded / INDEX).unlink()  # shards without their index: which of them are current is unknown
    with pytest.raises(ValueError, match="only"):
        _load(sharded)


def test_the_staged_path_puts_the_same_bytes_in_place(tmp_path: Path) -> None:
    """CUDA loads stage a shard in pinned memory and copy each tensor to its place; the same logic, on the CPU."""
    tensors = {
        "a": torch.arange(3, dtype=torch.uint8),  # what follows starts at an odd offset
        "b": torch.randn(5, 7),
        "c": torch.randn(4, dtype=torch.bfloat16),
        "d": torch.randn(2, 6),
    }
    save_file(tensors, tmp_path / "s.safetensors")
    shard = read_header(tmp_path / "s.safetensors", {"b", "c", "d"})
    dest = {"b": torch.empty(5, 7), "c": torch.empty(4), "d": torch.empty(4, 6)[1:3]}  # c converted as it lands
    for stage_bytes in (1 << 20, 24):  # whole tensors per piece; tensors split over many pieces
        for t in dest.values():
            t.fill_(0)
        with open(shard.path, "rb", buffering=0) as fh:
            _read_staged(fh, shard.data_start, shard.entries, dest, pin=False, stage_bytes=stage_bytes)
        assert torch.equal(dest["b"], tensors["b"]) and torch.equal(dest["d"], tensors["d"])
        assert torch.equal(dest["c"], tensors["c"].float())


def test_a_header_whose_offsets_do_not_fit_its_shapes_is_refused(tmp_path: Path) -> None:
    save_file({"a": torch.randn(4, 4), "b": torch.randn(4, 4)}, tmp_path / "w.safetensors")
    data = bytearray((tmp_path / "w.safetensors").read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header["a"]["shape"] = [4, 8]  # says 128 bytes; its offsets hold 64: it would read b's bytes as its own
    text = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
    (tmp_path / "w.safetensors").write_bytes(bytes(data[:8]) + text + bytes(data[8 + header_len :]))
    with pytest.raises(ValueError, match="offsets"):
        read_header(tmp_path / "w.safetensors")
