"""Dropless MoE expert compute.

Shape legend (suffixes on tensor names):
    T  tokens                     D  model (hidden) width
    K  experts chosen per token   E  experts in the pool
    F  expert FFN width           N  routed (token, k) pairs = T * K

Pipeline: routing indices `topk_idx_TK` → per-expert token counts `tokens_per_expert_E` → a stable permutation of
the N (token, k) pairs grouped by expert → SwiGLU expert MLP over the contiguous per-expert segments → weighted
un-permute and combine back to token order. No capacity factor: every pair is computed.

Expert weights use nn.Linear's [out, in] layout so one expert's slice is exactly the published checkpoint tensor:
    w1_EFD = gate_proj, w3_EFD = up_proj, w2_EDF = down_proj.

Backends:
    torch  grouped GEMM via torch.nn.functional.grouped_mm where the device/dtype supports it, else a loop over
           experts (never over tokens) on the contiguous segments.
    eager  a plain per-expert loop with masks; the reference in tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("torch", "eager", "megablocks")


@dataclass
class RoutingPlan:
    """The permutation that groups the N routed pairs by expert."""

    tokens_per_expert_E: torch.Tensor  # int64 [E]
    order_N: torch.Tensor  # indices into the flattened [T*K] pairs, grouped by expert (stable)
    token_N: torch.Tensor  # token index of each permuted pair
    weight_N: torch.Tensor  # combine weight of each permuted pair


def plan_routing(topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor, num_experts: int) -> RoutingPlan:
    """Group routed (token, k) pairs by expert; stable so the order inside each expert follows token order."""
    k = topk_idx_TK.shape[1]
    flat_idx_N = topk_idx_TK.reshape(-1)
    tokens_per_expert_E = torch.bincount(flat_idx_N, minlength=num_experts)
    order_N = torch.argsort(flat_idx_N, stable=True)
    return RoutingPlan(
        tokens_per_expert_E=tokens_per_expert_E,
        order_N=order_N,
        token_N=torch.div(order_N, k, rounding_mode="floor"),
        weight_N=topk_w_TK.reshape(-1)[order_N],
    )


def _grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    # grouped_mm needs 16-byte aligned row strides for both operands and the output.
    if any(n * x.element_size() % 16 for n in (x.shape[-1], w.shape[-2])):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.device.type == "cpu" and x.dtype == torch.float32


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # grouped_mm's CPU backward rejects expanded (stride-0) gradients, e.g. from a .sum() loss.
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def _grouped_linear(x_ND: torch.Tensor, w_EOI: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Per-expert x @ w[e].T over contiguous segments: [N, I] x [E, O, I] → [N, O]."""
    if _grouped_mm_supported(x_ND, w_EOI):
        offs_E = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
        return _contiguous_grad(F.grouped_mm(x_ND, w_EOI.transpose(-2, -1), offs=offs_E))
    outs = []
    start = 0
    for e, n in enumerate(tokens_per_expert_E.tolist()):
        if n:
            outs.append(x_ND[start : start + n] @ w_EOI[e].T)
            start += n
    if not outs:
        return x_ND.new_zeros(0, w_EOI.shape[1])
    return torch.cat(outs)


def _experts_torch(
    x_TD: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_w_TK: torch.Tensor,
    w1_EFD: torch.Tensor,
    w3_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
) -> torch.Tensor:
    plan = plan_routing(topk_idx_TK, topk_w_TK, w1_EFD.shape[0])
    x_ND = x_TD[plan.token_N]
    counts = plan.tokens_per_expert_E
    h_NF = F.silu(_grouped_linear(x_ND, w1_EFD, counts)) * _grouped_linear(x_ND, w3_EFD, counts)
    y_ND = _grouped_linear(h_NF, w2_EDF, counts) * plan.weight_N.unsqueeze(-1).to(x_TD.dtype)
    return torch.zeros_like(x_TD).index_add_(0, plan.token_N, y_ND)


def _experts_eager(
    x_TD: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_w_TK: torch.Tensor,
    w1_EFD: torch.Tensor,
    w3_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
) -> torch.Tensor:
    y_TD = torch.zeros_like(x_TD)
    for e in range(w1_EFD.shape[0]):
        token_idx, k_idx = torch.where(topk_idx_TK == e)
        if token_idx.numel() == 0:
            continue
        x = x_TD[token_idx]
        h = F.silu(x @ w1_EFD[e].T) * (x @ w3_EFD[e].T)
        y = (h @ w2_EDF[e].T) * topk_w_TK[token_idx, k_idx].unsqueeze(-1).to(x_TD.dtype)
        y_TD = y_TD.index_add(0, token_idx, y)
    if x_TD.shape[0] == 0:
        # keep the (empty) result on the autograd graph, as the other backends do
        y_TD = y_TD + 0 * (x_TD.sum() + w1_EFD.sum() + w3_EFD.sum() + w2_EDF.sum() + topk_w_TK.sum())
    return y_TD


def moe_experts(
    x_TD: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_w_TK: torch.Tensor,
    w1_EFD: torch.Tensor,
    w3_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    backend: str = "torch",
) -> torch.Tensor:
    """Σ_k w[t,k] · SwiGLU_{idx[t,k]}(x[t]) for every token t, with no token dropped."""
    if x_TD.dim() != 2 or topk_idx_TK.shape != topk_w_TK.shape or topk_idx_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(
            f"moe_experts: expected x_TD [T, D] and topk_idx_TK/topk_w_TK [T, K], got x_TD {tuple(x_TD.shape)}, "
            f"topk_idx_TK {tuple(topk_idx_TK.shape)}, topk_w_TK {tuple(topk_w_TK.shape)}"
        )
    if backend == "torch":
        return _experts_torch(x_TD, topk_idx_TK, topk_w_TK, w1_EFD, w3_EFD, w2_EDF)
    if backend == "eager":
        return _experts_eager(x_TD, topk_idx_TK, topk_w_TK, w1_EFD, w3_EFD, w2_EDF)
    if backend == "megablocks":
        raise RuntimeError(
            "moe.backend=megablocks is not available yet: the MegaBlocks backend (CUDA only, installed by a "
            "separate documented step) lands with the kernels issue; use moe.backend=torch"
        )
    raise ValueError(f"moe.backend={backend!r} is not one of {BACKENDS}")
