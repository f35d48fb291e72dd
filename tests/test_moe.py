"""The device-side MoE path gives the same outputs as stock diffusers, and traces as one graph."""

from __future__ import annotations

import copy
import gc
import weakref
from pathlib import Path

import pytest
import torch
from diffusers import HiDreamImageTransformer2DModel
from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

from inference.loading import load_model
from inference.moe import patch_moe


def _layer(dim: int, tokens: int, dtype: torch.dtype, seed: int = 0) -> tuple[MOEFeedForwardSwiGLU, torch.Tensor]:
    torch.manual_seed(seed)
    layer = MOEFeedForwardSwiGLU(dim, 4 * dim, num_routed_experts=4, num_activated_experts=2).eval().to(dtype)
    return layer, torch.randn(2, tokens, dim, dtype=dtype)


@pytest.mark.parametrize(("dim", "tokens"), [(32, 300), (128, 64)])
def test_moe_layer_matches_stock_in_fp32(dim: int, tokens: int) -> None:
    stock, x = _layer(dim, tokens, torch.float32)
    ours = copy.deepcopy(stock)
    assert patch_moe(ours) == 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x), stock(x), rtol=1e-5, atol=1e-5)


def test_compiled_fp32_layer_takes_the_all_experts_way_and_matches_stock() -> None:
    """fp32 under torch.compile (the CPU tests' warm-up) cannot use the grouped kernel; its way must agree."""
    import torch._dynamo

    stock, x = _layer(32, 300, torch.float32)
    ours = copy.deepcopy(stock)
    patch_moe(ours)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(ours, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), stock(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_moe_layer_of_the_released_size_matches_stock_within_bf16_tolerance() -> None:
    # HiDream-I1: 20 heads x 128 = 2560 wide, expert SwiGLU hidden 6912, 4 routed experts, 2 active.
    stock, x = _layer(2560, 96, torch.bfloat16)
    ours = copy.deepcopy(stock)
    patch_moe(ours)
    with torch.no_grad():
        expected, got = stock(x).float(), ours(x).float()
    # bf16 has 8 bits of mantissa; the two paths sum the same products in a different order.
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.9999


def test_patching_keeps_memory_and_state_dict() -> None:
    layer, _ = _layer(64, 8, torch.float32)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    patch_moe(layer)
    after = layer.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    expert = layer.experts[1]
    assert expert.w1.weight.untyped_storage().data_ptr() == layer._grouped.w13.untyped_storage().data_ptr()


def test_stacking_by_copy_frees_the_old_expert_weights() -> None:
    layer, x = _layer(64, 8, torch.float32)
    with torch.no_grad():
        expected = layer(x)
    old = [weakref.ref(w) for e in layer.experts for w in (e.w1.weight, e.w2.weight, e.w3.weight)]
    patch_moe(layer)
    gc.collect()
    assert all(ref() is None for ref in old)  # one copy of the experts, not two
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def _inputs() -> dict[str, object]:
    torch.manual_seed(1)
    return {
        "hidden_states": torch.randn(2, 16, 64, 64),
        "timesteps": torch.tensor([500.0, 500.0]),
        "encoder_hidden_states_t5": torch.randn(2, 16, 32),
        "encoder_hidden_states_llama3": torch.randn(2, 2, 16, 32),
        "pooled_embeds": torch.randn(2, 64),
        "return_dict": False,
    }


def test_loaded_experts_moved_apart_are_stacked_by_copy(tiny_root: Path) -> None:
    """After ``.to()`` every weight has its own storage: the loader's layout is gone and patch_moe copies."""
    directory = tiny_root / "pipeline" / "transformer"
    ours, _ = load_model(HiDreamImageTransformer2DModel, directory, device="cpu", dtype=torch.bfloat16)
    ours = ours.to(torch.float32)
    layer = ours.double_stream_blocks[0].block.ff_i
    w1, w3 = layer.experts[1].w1.weight, layer.experts[1].w3.weight.clone()
    assert w1.untyped_storage().data_ptr() != layer.experts[1].w3.weight.untyped_storage().data_ptr()
    patch_moe(ours)
    assert torch.equal(layer._grouped.w13[1, layer._grouped.hidden :], w3)
    stock = HiDreamImageTransformer2DModel.from_pretrained(directory).eval().to(torch.bfloat16).to(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(**_inputs())[0], stock(**_inputs())[0], rtol=1e-4, atol=1e-4)


def test_whole_tiny_transformer_matches_stock(tiny_root: Path) -> None:
    stock = HiDreamImageTransformer2DModel.from_pretrained(tiny_root / "pipeline" / "transformer").eval()
    ours = copy.deepcopy(stock)
    assert patch_moe(ours) == 2  # one double-stream and one single-stream block
    with torch.no_grad():
        torch.testing.assert_close(ours(**_inputs())[0], stock(**_inputs())[0], rtol=1e-4, atol=1e-4)


def test_moe_layer_traces_as_one_graph_where_stock_cannot() -> None:
    import torch._dynamo

    # bf16, as on the GPU (the grouped kernel's shape rules for tracing are bf16's).
    stock, x = _layer(64, 32, torch.bfloat16)
    ours = copy.deepcopy(stock)
    patch_moe(ours)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(ours, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), ours(x))
        torch._dynamo.reset()
        with pytest.raises(Exception, match=r"(?i)graph break|numpy|unsupported|data-dependent"):
            torch.compile(stock, backend="eager", fullgraph=True)(x)
    torch._dynamo.reset()


def test_gpu_bench_runs_end_to_end_on_a_tiny_config(tmp_path: Path) -> None:
    """The GPU benchmark is one prepared script: check it runs (on the CPU, tiny) before it meets a GPU."""
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_bench.py"
    env = os.environ | {"BENCH_DISK_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(script), "--tiny", "--steps", "1", "--warmup", "0", "--load-gb", "0.001"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stock" in done.stdout and "ours" in done.stdout and "GB/s" in done.stdout
