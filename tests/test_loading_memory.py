"""Loading plus ``patch_moe`` holds the model's bytes once, measured in fresh processes on a sharded model.

The routed experts are restacked for grouped GEMMs; if the loader's buffers and the stacks both hold them,
memory grows by the experts' bytes (at the released size, about 19 GiB). The model here is reduced but keeps
the released model's proportions where they matter: several shards, and most bytes in the routed experts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# 16 heads x 64 = 1024 wide: 173 M parameters (0.69 GB in fp32), 60% of them routed experts, in 5 shards.
CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 64,
    "num_attention_heads": 16,
    "caption_channels": [32, 32],
    "text_emb_dim": 64,
    "num_routed_experts": 4,
    "num_activated_experts": 2,
    "axes_dims_rope": [32, 16, 16],
    "max_resolution": [128, 128],
    "llama_layers": [0, 1, 1, 1],
}

BUILD = """
import json, sys
import torch
from diffusers import HiDreamImageTransformer2DModel

torch.manual_seed(0)
HiDreamImageTransformer2DModel(**json.loads(sys.argv[2])).save_pretrained(sys.argv[1], max_shard_size="150MB")
"""

MEASURE = """
import json, sys
import torch
from diffusers import HiDreamImageTransformer2DModel
from inference.loading import load_model
from inference.moe import patch_moe

def status_kib(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))

directory = sys.argv[1]
torch.set_num_threads(2)
baseline = status_kib("VmRSS")
model, _ = load_model(HiDreamImageTransformer2DModel, directory, device="cpu", dtype=torch.float32)
layers = [m for m in model.modules() if type(m).__name__ == "MOEFeedForwardSwiGLU"]
first_expert_at = [m.experts[0].w1.weight.data_ptr() for m in layers]
patched = patch_moe(model)
# VmHWM, not ru_maxrss: Linux carries the parent's peak into a child's ru_maxrss across exec.
peak = status_kib("VmHWM")
model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

def shares(m):
    w13, w2 = m._grouped.w13.untyped_storage().data_ptr(), m._grouped.w2.untyped_storage().data_ptr()
    return all(
        e.w1.weight.untyped_storage().data_ptr() == w13 == e.w3.weight.untyped_storage().data_ptr()
        and e.w2.weight.untyped_storage().data_ptr() == w2
        for e in m.experts
    )

# Adopted, not copied: the stacks start where the loader put the first expert, and the Linears share them.
adopted = all(m._grouped.w13.data_ptr() == at and shares(m) for m, at in zip(layers, first_expert_at))
stock = HiDreamImageTransformer2DModel.from_pretrained(directory).eval()
torch.manual_seed(1)
inputs = {
    "hidden_states": torch.randn(1, 16, 32, 32),
    "timesteps": torch.tensor([500.0]),
    "encoder_hidden_states_t5": torch.randn(1, 8, 32),
    "encoder_hidden_states_llama3": torch.randn(2, 1, 8, 32),
    "pooled_embeds": torch.randn(1, 64),
    "return_dict": False,
}
with torch.no_grad():
    torch.testing.assert_close(model(**inputs)[0], stock(**inputs)[0], rtol=1e-4, atol=1e-4)
print(json.dumps({"baseline": baseline * 1024, "peak": peak * 1024, "model_bytes": model_bytes,
                  "patched": patched, "adopted": adopted}))
"""


def _python(script: str, *args: str) -> str:
    root = Path(__file__).resolve().parent.parent
    env = os.environ | {"PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=root,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_load_and_patch_moe_hold_the_model_once(tmp_path: Path) -> None:
    directory = tmp_path / "transformer"
    _python(BUILD, str(directory), json.dumps(CONFIG))  # its own process, so its memory is gone before we measure
    assert len(list(directory.glob("*.safetensors"))) >= 3
    assert (directory / "diffusion_pytorch_model.safetensors.index.json").is_file()

    got = json.loads(_python(MEASURE, str(directory)).splitlines()[-1])
    grown = got["peak"] - got["baseline"]
    figures = f"baseline {got['baseline'] / 2**20:.0f} MiB, peak {got['peak'] / 2**20:.0f} MiB, " + (
        f"model {got['model_bytes'] / 2**20:.0f} MiB: {grown / got['model_bytes']:.2f}x"
    )
    print(figures)  # `pytest -s tests/test_loading_memory.py` shows the figures the README quotes
    assert got["patched"] == 3, figures
    assert grown <= 1.05 * got["model_bytes"], figures
    assert got["adopted"], figures
