"""A device-side mixture-of-experts path for HiDream's transformer: same outputs, no host sync.

Stock diffusers (0.42) runs each MoE layer's inference with ``bincount().cpu().numpy()`` and a Python loop
over experts: the host waits for the GPU in every block (48 times a step), and ``torch.compile`` cannot
capture the layer as one graph. Here tokens are sorted by expert on the device and every expert's SwiGLU
runs as grouped matrix multiplies (``torch._grouped_mm``) whose group sizes stay on the device.

The experts' weights are restacked once into ``(experts, out, in)`` tensors and the original ``nn.Linear``
weights become views into them, so memory does not grow.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _grouped_mm_works(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """``torch._grouped_mm`` exists and can take these operands (it needs 16-byte-aligned strides)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    # The leading (non-unit) stride of each operand's matrix must be a multiple of 16 bytes.
    return all(max(t.stride(-1), t.stride(-2)) * t.element_size() % 16 == 0 for t in (x, *weights))


class GroupedExperts:
    """The routed experts of one ``MOEFeedForwardSwiGLU``, restacked for grouped GEMMs."""

    def __init__(self, moe: nn.Module) -> None:
        experts = list(moe.experts)
        hidden = experts[0].w1.weight.shape[0]
        with torch.no_grad():
            # w1 and w3 fused: one grouped GEMM computes both halves of the SwiGLU input.
            self.w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight], dim=0) for e in experts])
            self.w2 = torch.stack([e.w2.weight for e in experts])
        for i, e in enumerate(experts):  # the Linears now share the stacked storage
            e.w1.weight = nn.Parameter(self.w13[i, :hidden], requires_grad=False)
            e.w3.weight = nn.Parameter(self.w13[i, hidden:], requires_grad=False)
            e.w2.weight = nn.Parameter(self.w2[i], requires_grad=False)
        self.hidden = hidden
        self.num_experts = len(experts)

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """Sum over each token's chosen experts of weight x expert(token); x is (tokens, dim)."""
        if self.w13.device != x.device:
            raise RuntimeError("patch_moe() must run after the transformer is moved to its device and dtype")
        k = topk_idx.shape[-1]
        flat_idx = topk_idx.reshape(-1)
        order = flat_idx.argsort(stable=True)
        token_of = order // k
        # Group sizes stay on the device: nothing here waits for the GPU.
        offsets = torch.bincount(flat_idx, minlength=self.num_experts).cumsum(0).to(torch.int32)
        xs = x[token_of]
        w13, w2 = self.w13.to(x.dtype).transpose(-2, -1), self.w2.to(x.dtype).transpose(-2, -1)
        if _grouped_mm_works(xs, w13, w2):
            h13 = torch._grouped_mm(xs, w13, offs=offsets)
            h = F.silu(h13[:, : self.hidden]) * h13[:, self.hidden :]
            out = torch._grouped_mm(h.contiguous(), w2, offs=offsets)
        else:
            out = self._per_expert(xs, w13, w2, offsets)
        out = out * topk_weight.reshape(-1, 1)[order].to(out.dtype)
        return torch.zeros_like(x, dtype=out.dtype).index_add_(0, token_of, out)

    def _per_expert(self, xs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The same computation one expert at a time (for shapes the grouped kernel refuses)."""
        out = torch.empty(xs.shape[0], w2.shape[-1], dtype=xs.dtype, device=xs.device)
        bounds = [0, *offsets.tolist()]
        for e in range(self.num_experts):
            rows = slice(bounds[e], bounds[e + 1])
            h13 = xs[rows] @ w13[e]
            out[rows] = (F.silu(h13[:, : self.hidden]) * h13[:, self.hidden :]) @ w2[e]
        return out


def _forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """``MOEFeedForwardSwiGLU.forward`` for inference, on the device-side path."""
    if self.training and not self._force_inference_output:
        return self._stock_forward(x)
    identity, shape = x, x.shape
    topk_idx, topk_weight, _ = self.gate(x)
    y = self._grouped(x.reshape(-1, shape[-1]), topk_idx, topk_weight).view(*shape)
    return y + self.shared_experts(identity)


def patch_moe(transformer: nn.Module) -> int:
    """Switch every MoE layer of a HiDream transformer to the device-side path; returns how many.

    Call it after moving the transformer to its device and dtype: moving it later would copy the views apart.
    """
    patched = 0
    for module in transformer.modules():
        if type(module).__name__ == "MOEFeedForwardSwiGLU" and not hasattr(module, "_grouped"):
            module._grouped = GroupedExperts(module)
            module._stock_forward = module.forward
            module.forward = types.MethodType(_forward, module)
            patched += 1
    return patched
