"""A device-side mixture-of-experts path for HiDream's transformer: same outputs, no host sync.

Stock diffusers (0.42) runs each MoE layer's inference with ``bincount().cpu().numpy()`` and a Python loop
over experts: the host waits for the GPU in every block (48 times a step), and ``torch.compile`` cannot
capture the layer as one graph. Here tokens are sorted by expert on the device and every expert's SwiGLU
runs as grouped matrix multiplies (``torch._grouped_mm``) whose group sizes stay on the device.

The experts' weights live in two ``(experts, out, in)`` stacks per layer, ``w13`` (w1 and w3 fused) and ``w2``,
and the original ``nn.Linear`` weights are views into them, so memory does not grow. inference/loading.py
already reads the weights into that layout, and then the stacks are adopted as they are; otherwise (stock
``from_pretrained``, or after ``.to()``, which gives every weight its own storage) they are stacked by copy,
one layer at a time, and the old per-expert weights are freed: the transient is one layer's experts.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _grouped_mm_works(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """``torch._grouped_mm`` exists and can take these operands here (16-byte-aligned strides, and bf16 except in
    eager mode on the CPU).

    The CPU kernel also takes fp32, but the kernel's shape function (what ``torch.compile`` traces with) and the
    CUDA kernel take bf16 only; anything else goes the all-experts way, which compiles.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    # The leading (non-unit) stride of each operand's matrix must be a multiple of 16 bytes.
    if not all(max(t.stride(-1), t.stride(-2)) * t.element_size() % 16 == 0 for t in (x, *weights)):
        return False
    if all(t.dtype == torch.bfloat16 for t in (x, *weights)):
        return True
    cpu_dtypes = (torch.float32, torch.float16, torch.bfloat16)  # the CPU kernel refuses float64
    return (
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and all(t.dtype in cpu_dtypes for t in (x, *weights))
    )


def _adopt_stacks(experts: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stacks the experts' weights already are views into, if they are laid out exactly as stacked."""
    hidden, dim = experts[0].w1.weight.shape
    w13_0, w2_0 = experts[0].w1.weight, experts[0].w2.weight

    def at(t: torch.Tensor, base: torch.Tensor, offset: int, shape: tuple[int, int]) -> bool:
        return (
            t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
            and (t.dtype, t.device, t.shape, t.storage_offset()) == (base.dtype, base.device, shape, offset)
            and t.is_contiguous()
        )

    o13, o2, block = w13_0.storage_offset(), w2_0.storage_offset(), hidden * dim
    if not all(
        at(e.w1.weight, w13_0, o13 + 2 * i * block, (hidden, dim))
        and at(e.w3.weight, w13_0, o13 + (2 * i + 1) * block, (hidden, dim))
        and at(e.w2.weight, w2_0, o2 + i * block, (dim, hidden))
        for i, e in enumerate(experts)
    ):
        return None

    def stack(base: torch.Tensor, offset: int, size: tuple[int, int, int]) -> torch.Tensor:
        stride = (size[1] * size[2], size[2], 1)
        return torch.empty(0, dtype=base.dtype, device=base.device).set_(base.untyped_storage(), offset, size, stride)

    return stack(w13_0, o13, (len(experts), 2 * hidden, dim)), stack(w2_0, o2, (len(experts), dim, hidden))


def _copy_stacks(experts: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """New stacks holding copies of the experts' weights (their originals are freed once re-pointed)."""
    first = experts[0].w1.weight
    hidden, dim = first.shape
    w13 = torch.empty(len(experts), 2 * hidden, dim, dtype=first.dtype, device=first.device)
    w2 = torch.empty(len(experts), dim, hidden, dtype=first.dtype, device=first.device)
    for i, e in enumerate(experts):  # filled in place: no per-expert temporaries beside the new stacks
        w13[i, :hidden].copy_(e.w1.weight)
        w13[i, hidden:].copy_(e.w3.weight)
        w2[i].copy_(e.w2.weight)
    return w13, w2


class GroupedExperts:
    """The routed experts of one ``MOEFeedForwardSwiGLU``, restacked for grouped GEMMs."""

    def __init__(self, moe: nn.Module) -> None:
        experts = list(moe.experts)
        hidden = experts[0].w1.weight.shape[0]
        with torch.no_grad():
            self.w13, self.w2 = _adopt_stacks(experts) or _copy_stacks(experts)
        for i, e in enumerate(experts):  # the Linears share the stacked storage; their old weights are dropped
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
        # Group sizes stay on the device: nothing here waits for the GPU. (Not bincount: on CUDA it reads the
        # indices' min and max back to the host, and its data-dependent size breaks the compiled graph.)
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat_idx, torch.ones_like(flat_idx))
        offsets = counts.cumsum(0).to(torch.int32)
        xs = x[token_of]
        w13, w2 = self.w13.to(x.dtype).transpose(-2, -1), self.w2.to(x.dtype).transpose(-2, -1)
        if _grouped_mm_works(xs, w13, w2):
            h13 = torch._grouped_mm(xs, w13, offs=offsets)
            h = F.silu(h13[:, : self.hidden]) * h13[:, self.hidden :]
            out = torch._grouped_mm(h.contiguous(), w2, offs=offsets)
        else:
            out = self._all_experts(xs, w13, w2, flat_idx[order])
        out = out * topk_weight.reshape(-1, 1)[order].to(out.dtype)
        return torch.zeros_like(x, dtype=out.dtype).index_add_(0, token_of, out)

    def _all_experts(
        self, xs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, expert_of: torch.Tensor
    ) -> torch.Tensor:
        """The same result with every expert run on every row, each row keeping its own expert's output.

        ``experts / top_k`` times the work of the grouped path, but still no host sync and no data-dependent
        shapes, so it traces and compiles; used for dtypes the grouped kernel refuses (fp32 on the CPU).
        """
        h13 = torch.matmul(xs.unsqueeze(0), w13)  # (experts, rows, 2 * hidden)
        out = torch.matmul(F.silu(h13[..., : self.hidden]) * h13[..., self.hidden :], w2)  # (experts, rows, dim)
        return out.gather(0, expert_of.view(1, -1, 1).expand(1, -1, out.shape[-1])).squeeze(0)


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
