"""The parallel safetensors loader gives exactly the tensors stock loading gives."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import HiDreamImageTransformer2DModel
from PIL import Image
from safetensors.torch import save_file

from inference.loading import load_model, read_safetensors
from inference.runner import GenerateParams, HiDreamRunner
from inference.variants import VARIANTS


def test_transformer_loads_identically_to_from_pretrained(tiny_root: Path) -> None:
    directory = tiny_root / "pipeline" / "transformer"
    ours, stats = load_model(HiDreamImageTransformer2DModel, directory, device="cpu", dtype=torch.float32)
    stock = HiDreamImageTransformer2DModel.from_pretrained(directory)
    a, b = ours.state_dict(), stock.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
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
