"""Dropless MoE expert compute.

Shape legend (suffixes on tensor names):
    T  tokens                     D  model (hidden) width
    K  experts chosen per token   E  experts in the pool
    F  expert FFN width           N  routed (token, k) pairs = T * K

Pipeline: routing indices `topk_idx_TK` → per-expert token counts `tokens_per_expert_E` → a stable permutation of
the N (token, k) pairs grouped by expert → SwiGLU expert MLP over the contiguous per-expert segments → weighted
un-permute and combine back to token order. No capacity factor: every pair is computed.

Expert weights use nn.Linear's [out, in] layout, gate and up fused into one GEMM as transformers does:
    w13_E2FD[e] = cat(gate_proj[e], up_proj[e])   w2_EDF[e] = down_proj[e]

Backends:
    torch       a custom autograd function over grouped GEMMs (`F.grouped_mm` where the device, dtype and alignment
                allow it, else one GEMM per expert segment — never a loop over tokens). Backward recomputes the
                SwiGLU activation from the saved [N, 2F] pre-activations and gets the combine-weight gradient from
                the down projection's input side, so neither the activation nor the [N, D] expert outputs are kept.
    eager       the plain per-expert masked loop under autograd; the reference in tests.
    megablocks  MegaBlocks' grouped GEMM (CUDA only; optional install, see docs/kernels.md).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

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


# ---- grouped GEMM primitives ---------------------------------------------------------------------------------------


# How CPU grouped GEMMs run: "threads" splits the expert segments over the intra-op threads, each GEMM
# single-threaded (small per-expert GEMMs scale badly when MKL splits each one over cores); "grouped_mm" uses
# F.grouped_mm (one multi-threaded GEMM per expert inside); "loop" is one multi-threaded GEMM per expert from Python.
CPU_GEMM_MODES = ("threads", "grouped_mm", "loop")
cpu_gemm_mode = "grouped_mm"
_pool: Optional[ThreadPoolExecutor] = None


def _use_grouped_mm(*tensors: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    t = tensors[0]
    if t.device.type == "cuda":
        if t.dtype != torch.bfloat16 or torch.cuda.get_device_capability(t.device)[0] < 9:
            return False
    elif t.device.type != "cpu" or t.dtype != torch.float32 or cpu_gemm_mode != "grouped_mm":
        return False
    # grouped_mm needs 16-byte aligned row strides on every operand.
    return all(s * t.element_size() % 16 == 0 for x in tensors for s in x.shape[-2:])


def _segments(counts_E: list[int]) -> list[tuple[int, int, int]]:
    out, start = [], 0
    for e, n in enumerate(counts_E):
        if n:
            out.append((e, start, start + n))
        start += n
    return out


def _for_each_segment(
    segments: list[tuple[int, int, int]], fn: Callable[[int, int, int], None], device: torch.device
) -> None:
    """Run fn(e, start, end) for every expert segment, on CPU spread over the intra-op threads."""
    global _pool
    n_threads = torch.get_num_threads()
    if device.type != "cpu" or cpu_gemm_mode != "threads" or n_threads <= 1 or len(segments) < 2:
        for seg in segments:
            fn(*seg)
        return
    # Greedy balance of rows (∝ FLOPs) over threads; the caller's thread takes the first bucket.
    buckets: list[list[tuple[int, int, int]]] = [[] for _ in range(n_threads)]
    loads = [0] * n_threads
    for seg in sorted(segments, key=lambda sg: sg[1] - sg[2]):
        i = loads.index(min(loads))
        buckets[i].append(seg)
        loads[i] += seg[2] - seg[1]
    if _pool is None or _pool._max_workers != n_threads - 1:
        _pool = ThreadPoolExecutor(n_threads - 1, thread_name_prefix="moe-gemm")

    grad_enabled = torch.is_grad_enabled()  # grad mode is thread-local: carry the caller's into the pool

    def run(bucket: list[tuple[int, int, int]]) -> None:
        with torch.set_grad_enabled(grad_enabled):
            for seg in bucket:
                fn(*seg)

    # Process-wide for MKL, so each GEMM runs on one core while the buckets run side by side. Not reentrant: two
    # threads running MoE layers at once in one process would fight over it (training and serving don't).
    torch.set_num_threads(1)
    try:
        futures = [_pool.submit(run, b) for b in buckets[1:] if b]
        run(buckets[0])
        for fut in futures:
            fut.result()
    finally:
        torch.set_num_threads(n_threads)


def _host_counts(counts_E: torch.Tensor, counts: Optional[list[int]]) -> list[int]:
    return counts if counts is not None else counts_E.tolist()


def gmm_nt(
    x_NI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor, counts: Optional[list[int]]
) -> torch.Tensor:
    """out[seg e] = x[seg e] @ w[e]ᵀ: [N, I] × [E, O, I] → [N, O]."""
    if _use_grouped_mm(x_NI, w_EOI):
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        return F.grouped_mm(x_NI, w_EOI.transpose(-2, -1), offs=offs)
    out = x_NI.new_empty(x_NI.shape[0], w_EOI.shape[1])
    counts = _host_counts(counts_E, counts)
    _for_each_segment(_segments(counts), lambda e, a, b: torch.mm(x_NI[a:b], w_EOI[e].T, out=out[a:b]), x_NI.device)
    return out


def gmm_nn(
    x_NO: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor, counts: Optional[list[int]]
) -> torch.Tensor:
    """out[seg e] = x[seg e] @ w[e]: [N, O] × [E, O, I] → [N, I] (the input-gradient of `gmm_nt`)."""
    if _use_grouped_mm(x_NO, w_EOI):
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        return F.grouped_mm(x_NO, w_EOI, offs=offs)
    out = x_NO.new_empty(x_NO.shape[0], w_EOI.shape[2])
    counts = _host_counts(counts_E, counts)
    _for_each_segment(_segments(counts), lambda e, a, b: torch.mm(x_NO[a:b], w_EOI[e], out=out[a:b]), x_NO.device)
    return out


def gmm_tn(g_NO: torch.Tensor, x_NI: torch.Tensor, counts_E: torch.Tensor, counts: Optional[list[int]]) -> torch.Tensor:
    """out[e] = g[seg e]ᵀ @ x[seg e]: [N, O] × [N, I] → [E, O, I] (the weight-gradient of `gmm_nt`)."""
    if _use_grouped_mm(g_NO, x_NI):
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        return F.grouped_mm(g_NO.T, x_NI, offs=offs)
    counts = _host_counts(counts_E, counts)
    out = g_NO.new_empty(len(counts), g_NO.shape[1], x_NI.shape[1])
    for e in (e for e, n in enumerate(counts) if n == 0):
        out[e].zero_()  # only experts without tokens: zeroing all of [E, O, I] costs as much as a GEMM
    _for_each_segment(_segments(counts), lambda e, a, b: torch.mm(g_NO[a:b].T, x_NI[a:b], out=out[e]), g_NO.device)
    return out


# ---- torch backend: fused autograd function ------------------------------------------------------------------------


class _GroupedSwiGLU(torch.autograd.Function):
    """y_TD = Σ_pairs w_N · (silu(x W1ᵀ) ⊙ x W3ᵀ) W2ᵀ scattered to tokens, with a memory-lean backward."""

    @staticmethod
    def forward(ctx, x_TD, weight_N, w13_E2FD, w2_EDF, token_N, counts_E):  # type: ignore[override]
        # The per-expert loops need the counts on the host. On CUDA that is a sync, so it is left to the loops
        # (`_host_counts`); grouped_mm takes them as a device tensor.
        counts = counts_E.tolist() if counts_E.device.type == "cpu" else None
        f = w2_EDF.shape[-1]
        x_ND = x_TD.index_select(0, token_N)
        h_N2F = gmm_nt(x_ND, w13_E2FD, counts_E, counts)
        a_NF = F.silu(h_N2F[:, :f]) * h_N2F[:, f:]
        y_ND = gmm_nt(a_NF, w2_EDF, counts_E, counts)
        y_ND.mul_(weight_N.unsqueeze(-1).to(y_ND.dtype))
        out_TD = torch.zeros_like(x_TD).index_add_(0, token_N, y_ND)
        ctx.save_for_backward(x_TD, weight_N, w13_E2FD, w2_EDF, token_N, counts_E, h_N2F)
        ctx.counts = counts
        return out_TD

    @staticmethod
    def backward(ctx, g_TD):  # type: ignore[override]
        x_TD, weight_N, w13_E2FD, w2_EDF, token_N, counts_E, h_N2F = ctx.saved_tensors
        counts = ctx.counts
        f = w2_EDF.shape[-1]
        g_ND = g_TD.contiguous().index_select(0, token_N)
        gate_NF, up_NF = h_N2F[:, :f], h_N2F[:, f:]
        silu_NF = F.silu(gate_NF)
        a_NF = silu_NF * up_NF  # recomputed instead of saved
        # d(y·w)/da = w · g W2: the unweighted product also gives the combine-weight gradient <g W2, a>.
        ga_NF = gmm_nn(g_ND, w2_EDF, counts_E, counts)
        grad_weight_N = (ga_NF * a_NF).sum(-1).to(weight_N.dtype)
        w_N1 = weight_N.unsqueeze(-1).to(ga_NF.dtype)
        ga_NF.mul_(w_N1)
        grad_w2 = gmm_tn(g_ND.mul_(w_N1), a_NF, counts_E, counts)
        del g_ND, a_NF  # the [N, D] and [N, F] temporaries go before the [N, 2F] ones come (peak memory)
        # Few full passes over the [N, 2F] buffers: they dominate the non-GEMM time.
        dh_N2F = torch.empty_like(h_N2F)
        torch.mul(ga_NF, silu_NF, out=dh_N2F[:, f:])
        del silu_NF
        dh_N2F[:, :f] = torch.ops.aten.silu_backward(ga_NF.mul_(up_NF), gate_NF)
        del ga_NF
        x_ND = x_TD.index_select(0, token_N)
        grad_w13 = gmm_tn(dh_N2F, x_ND, counts_E, counts)
        grad_x_TD = torch.zeros_like(x_TD).index_add_(0, token_N, gmm_nn(dh_N2F, w13_E2FD, counts_E, counts))
        return grad_x_TD, grad_weight_N, grad_w13, grad_w2, None, None


def _experts_torch(x_TD, topk_idx_TK, topk_w_TK, w13_E2FD, w2_EDF) -> torch.Tensor:
    plan = plan_routing(topk_idx_TK, topk_w_TK, w13_E2FD.shape[0])
    return _GroupedSwiGLU.apply(x_TD, plan.weight_N, w13_E2FD, w2_EDF, plan.token_N, plan.tokens_per_expert_E)


# ---- eager reference -----------------------------------------------------------------------------------------------


def _experts_eager(x_TD, topk_idx_TK, topk_w_TK, w13_E2FD, w2_EDF) -> torch.Tensor:
    f = w2_EDF.shape[-1]
    y_TD = torch.zeros_like(x_TD)
    # unbind once: indexing w[e] per expert would make autograd zero-fill and sum E full-size weight gradients
    w13_list, w2_list = w13_E2FD.unbind(0), w2_EDF.unbind(0)
    for e in range(w13_E2FD.shape[0]):
        token_idx, k_idx = torch.where(topk_idx_TK == e)
        if token_idx.numel() == 0:
            continue
        x = x_TD[token_idx]
        h = x @ w13_list[e].T
        y = (F.silu(h[:, :f]) * h[:, f:]) @ w2_list[e].T
        y_TD = y_TD.index_add(0, token_idx, y * topk_w_TK[token_idx, k_idx].unsqueeze(-1).to(x_TD.dtype))
    if x_TD.shape[0] == 0:
        # keep the (empty) result on the autograd graph, as the other backends do
        y_TD = y_TD + 0 * (x_TD.sum() + w13_E2FD.sum() + w2_EDF.sum() + topk_w_TK.sum())
    return y_TD


# ---- megablocks (optional, CUDA) -----------------------------------------------------------------------------------

MEGABLOCKS_INSTALL = (
    "pip install --no-build-isolation --no-deps grouped_gemm (MegaBlocks' grouped GEMM kernels, built against the "
    "installed torch; needs nvcc; see docs/kernels.md)"
)


def _experts_megablocks(x_TD, topk_idx_TK, topk_w_TK, w13_E2FD, w2_EDF) -> torch.Tensor:
    devices = {t.device.type for t in (x_TD, w13_E2FD, w2_EDF)}
    if devices != {"cuda"}:
        raise RuntimeError(
            f"moe.backend=megablocks needs CUDA tensors, got devices {sorted(devices)}; use moe.backend=torch on CPU"
        )
    if {x_TD.dtype, w13_E2FD.dtype, w2_EDF.dtype} != {torch.bfloat16}:
        raise RuntimeError(
            "moe.backend=megablocks runs bf16 only (grouped_gemm kernels); got "
            f"x {x_TD.dtype}, w13 {w13_E2FD.dtype}, w2 {w2_EDF.dtype}"
        )
    try:
        import grouped_gemm.ops as gg  # MegaBlocks' grouped GEMM kernels
    except ImportError as e:
        raise RuntimeError(
            f"moe.backend=megablocks: MegaBlocks is not installed ({e}); install with: {MEGABLOCKS_INSTALL}"
        ) from e
    plan = plan_routing(topk_idx_TK, topk_w_TK, w13_E2FD.shape[0])
    f = w2_EDF.shape[-1]
    batch_sizes = plan.tokens_per_expert_E.cpu()
    x_ND = x_TD.index_select(0, plan.token_N)
    h_N2F = gg.gmm(x_ND, w13_E2FD, batch_sizes, trans_b=True)
    a_NF = F.silu(h_N2F[:, :f]) * h_N2F[:, f:]
    y_ND = gg.gmm(a_NF, w2_EDF, batch_sizes, trans_b=True) * plan.weight_N.unsqueeze(-1).to(x_TD.dtype)
    return torch.zeros_like(x_TD).index_add(0, plan.token_N, y_ND)


# ---- entry point ---------------------------------------------------------------------------------------------------


def _check_expert_ids(topk_idx_TK: torch.Tensor, e: int) -> None:
    if topk_idx_TK.device.type == "cuda":
        # A host-side check would stall the CPU on every MoE layer until the GPU catches up (two syncs per layer);
        # the asynchronous assert fails the next synchronizing CUDA call instead.
        in_range = ((topk_idx_TK >= 0) & (topk_idx_TK < e)).all()
        torch._assert_async(in_range, f"moe_experts: expert ids must be in [0, {e})")
        return
    lo, hi = int(topk_idx_TK.min()), int(topk_idx_TK.max())
    if lo < 0 or hi >= e:
        raise ValueError(f"moe_experts: expert ids must be in [0, {e}), got min {lo} max {hi}")


def moe_experts(
    x_TD: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_w_TK: torch.Tensor,
    w13_E2FD: torch.Tensor,
    w2_EDF: torch.Tensor,
    backend: str = "torch",
) -> torch.Tensor:
    """Σ_k w[t,k] · SwiGLU_{idx[t,k]}(x[t]) for every token t, with no token dropped.

    For two expert pools (e.g. the VL model's text and vision experts, possibly of different widths F), call once
    per pool with that pool's tokens and weights.
    """
    e, two_f, d = w13_E2FD.shape if w13_E2FD.dim() == 3 else (None, None, None)
    if (
        x_TD.dim() != 2
        or topk_idx_TK.dim() != 2
        or topk_idx_TK.shape != topk_w_TK.shape
        or topk_idx_TK.shape[0] != x_TD.shape[0]
        or e is None
        or d != x_TD.shape[1]
        or two_f % 2
        or tuple(w2_EDF.shape) != (e, d, two_f // 2)
    ):
        raise ValueError(
            "moe_experts: expected x_TD [T, D], topk_idx_TK/topk_w_TK [T, K], w13_E2FD [E, 2F, D], w2_EDF [E, D, F]; "
            f"got x_TD {tuple(x_TD.shape)}, topk_idx_TK {tuple(topk_idx_TK.shape)}, "
            f"topk_w_TK {tuple(topk_w_TK.shape)}, "
            f"w13_E2FD {tuple(w13_E2FD.shape)}, w2_EDF {tuple(w2_EDF.shape)}"
        )
    if topk_idx_TK.numel():
        _check_expert_ids(topk_idx_TK, e)
    if backend == "torch":
        return _experts_torch(x_TD, topk_idx_TK, topk_w_TK, w13_E2FD, w2_EDF)
    if backend == "eager":
        return _experts_eager(x_TD, topk_idx_TK, topk_w_TK, w13_E2FD, w2_EDF)
    if backend == "megablocks":
        return _experts_megablocks(x_TD, topk_idx_TK, topk_w_TK, w13_E2FD, w2_EDF)
    raise ValueError(f"moe.backend={backend!r} is not one of {BACKENDS}")


def expert_flops(num_pairs: int, hidden: int, ffn: int, backward: bool = True) -> float:
    """Matmul FLOPs of the expert MLPs for `num_pairs` routed pairs (forward, or forward + backward)."""
    fwd = 2.0 * num_pairs * hidden * ffn * 3
    return 3 * fwd if backward else fwd


__all__ = ["BACKENDS", "MEGABLOCKS_INSTALL", "RoutingPlan", "expert_flops", "moe_experts", "plan_routing"]
