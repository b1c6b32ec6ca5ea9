"""Expert parallelism (EP): each MoE layer's experts split across the ranks of an EP process group.

Shape legend (suffixes on tensor names), as in kernels/moe.py:
    T  tokens on this rank         D  model (hidden) width
    K  experts chosen per token    E  experts in the pool (global)
    F  expert FFN width            N  routed (token, k) pairs sent by this rank = T * K
    P  ranks in the EP group       L  experts (slots) per rank = E / P
    R  routed pairs received by this rank (from all P ranks)

Placement. `placement_E[e]` is the *physical slot* of global expert e; slot s lives on EP rank s // L at local index
s % L. The identity placement puts experts [r·L, (r+1)·L) on rank r; any permutation is allowed (e.g. one that spreads
hot experts over ranks), and the model's numerics do not depend on it — only where the compute happens.

Forward of one MoE layer (the router has already run, replicated, on this rank's T tokens; ids are global):
    global id → slot → (destination rank, local id); the N pairs sorted by slot, hence grouped by destination rank
    counts:  all_to_all_single of the [P, L] per-(rank, local expert) pair counts, so every rank learns how many rows
             it will receive from each source and for which of its local experts (no expert ids travel with rows)
    dispatch: differentiable all-to-all of the N token rows (x) → R rows on the ranks holding their experts
    experts: kernels.moe.moe_experts on the R rows with local ids and weight 1 (unweighted expert outputs)
    combine: differentiable all-to-all of the R outputs back to their source ranks, then the routing weights applied
             on the source rank and the K outputs of each token summed with index_add → [T, D]
The routing weights never leave their rank, so their gradient is the ordinary local product rule; the all-to-all's
backward is the reverse all-to-all (splits swapped), so gradients w.r.t. x and the expert weights flow across ranks.
Dropless: no capacity; every pair is computed wherever it is routed.

Collectives: `torch.distributed.all_to_all_single` with uneven splits. Gloo implements it for CPU tensors (uneven
splits, empty chunks and bf16 checked with torch 2.13), NCCL for CUDA tensors, so the same code runs on both; the
counts travel on x's device. One host sync per layer (the split sizes) is inherent to a dropless all-to-all.

Gradients (see `allreduce_gradients`): expert weights are sharded over the EP group and replicated over the
expert-data-parallel group (ranks holding the same slots); everything else is replicated on every rank. With each
rank's loss the mean over its local batch and the training objective their mean over the W world ranks (plain DP),
every gradient is: all-reduce SUM over the ranks holding a replica of the tensor, then divide by W.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from kernels.moe import moe_experts

ProcessGroup = Optional[dist.ProcessGroup]  # None: the default (world) group, as in torch.distributed

# ---- placement -----------------------------------------------------------------------------------------------------


def experts_per_rank(num_experts: int, ep_size: int) -> int:
    """L = E / P; EP needs every rank to hold the same number of expert slots."""
    if ep_size < 1:
        raise ValueError(f"expert parallelism: ep_size={ep_size} must be >= 1")
    if num_experts % ep_size:
        raise ValueError(
            f"expert parallelism: moe_num_experts={num_experts} is not divisible by expert_parallel_size={ep_size}; "
            "every EP rank must hold the same number of experts"
        )
    return num_experts // ep_size


def identity_placement(num_experts: int) -> torch.Tensor:
    """Expert e in slot e: rank r holds experts [r·L, (r+1)·L) in order."""
    return torch.arange(num_experts, dtype=torch.long)


def validate_placement(placement_E: torch.Tensor, num_experts: int, ep_size: int) -> torch.Tensor:
    """Check `placement_E` is a permutation of 0..E-1 (each slot holds exactly one expert); return it as int64 CPU."""
    experts_per_rank(num_experts, ep_size)
    p = torch.as_tensor(placement_E).detach().to("cpu", torch.long)
    if p.shape != (num_experts,) or not torch.equal(torch.sort(p).values, torch.arange(num_experts)):
        raise ValueError(
            f"expert parallelism: placement_E must be a permutation of 0..{num_experts - 1} (shape [{num_experts}]), "
            f"got {p.tolist()}"
        )
    return p


def slot_location(slot: Union[int, torch.Tensor], num_experts: int, ep_size: int):
    """(EP rank, local index) of a slot (int or tensor of slots)."""
    n_local = experts_per_rank(num_experts, ep_size)
    if isinstance(slot, torch.Tensor):
        return torch.div(slot, n_local, rounding_mode="floor"), slot % n_local
    return slot // n_local, slot % n_local


def local_experts(placement_E: torch.Tensor, ep_size: int, ep_rank: int) -> torch.Tensor:
    """Global ids of the experts held by `ep_rank`, in local-slot order: the rows of its weight shards."""
    n_local = experts_per_rank(placement_E.numel(), ep_size)
    expert_of_slot_E = torch.argsort(placement_E)  # inverse permutation: slot → global expert
    return expert_of_slot_E[ep_rank * n_local : (ep_rank + 1) * n_local]


# ---- differentiable all-to-all -------------------------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """Rows [sum(in_splits), ...] → [sum(out_splits), ...]; chunk i of the input goes to rank i of `group`.

    The backward sends each row's gradient back where the row came from: the same collective with splits swapped.
    """

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):  # type: ignore[override]
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        grad = g.new_empty((sum(ctx.in_splits),) + tuple(g.shape[1:]))
        dist.all_to_all_single(grad, g.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad, None, None, None


def all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup = None
) -> torch.Tensor:
    """Differentiable `all_to_all_single` along dim 0 with uneven splits."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


# ---- the MoEBlock hook ---------------------------------------------------------------------------------------------


class ExpertParallel(nn.Module):
    """Set as `MoEBlock.expert_parallel`: routes the block's (token, k) pairs to the ranks holding their experts."""

    def __init__(self, num_experts: int, group: ProcessGroup = None, placement_E: Optional[torch.Tensor] = None):
        super().__init__()
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.num_local = experts_per_rank(num_experts, self.ep_size)
        if placement_E is None:
            placement_E = identity_placement(num_experts)
        placement_E = validate_placement(placement_E, num_experts, self.ep_size)
        # Not persistent: checkpoints are saved gathered, in the published global layout (see gather_experts).
        self.register_buffer("placement_E", placement_E, persistent=False)

    def local_experts(self) -> torch.Tensor:
        return local_experts(self.placement_E.cpu(), self.ep_size, self.ep_rank)

    def forward(
        self,
        x_TD: torch.Tensor,
        topk_idx_TK: torch.Tensor,
        topk_w_TK: torch.Tensor,
        w13_local_L2FD: torch.Tensor,
        w2_local_LDF: torch.Tensor,
        backend: str = "torch",
    ) -> torch.Tensor:
        p, n_local = self.ep_size, self.num_local
        if w13_local_L2FD.shape[0] != n_local or w2_local_LDF.shape[0] != n_local:
            raise ValueError(
                f"expert parallelism: expected {n_local} local experts per rank, got weight shards "
                f"{tuple(w13_local_L2FD.shape)} / {tuple(w2_local_LDF.shape)} (were the experts sharded?)"
            )
        placement_E = self.placement_E.to(topk_idx_TK.device)
        slot_TK = placement_E[topk_idx_TK]
        if p == 1:  # no communication: slots are the local ids
            return moe_experts(x_TD, slot_TK, topk_w_TK, w13_local_L2FD, w2_local_LDF, backend)

        k = topk_idx_TK.shape[1]
        slot_N = slot_TK.reshape(-1)
        # Sorting by slot groups the pairs by destination rank (slot // L) and, within a rank, by local expert; stable
        # so each expert's rows stay in token order (the receiver's layout is then independent of sort internals).
        order_N = torch.argsort(slot_N, stable=True)
        token_N = torch.div(order_N, k, rounding_mode="floor")

        # Counts per (destination rank, local expert): row r goes to rank r. What comes back, row s = from rank s,
        # tells the receiver both the split sizes and which local expert each received row is for.
        send_counts_PL = torch.bincount(slot_N, minlength=self.num_experts).view(p, n_local)
        recv_counts_PL = torch.empty_like(send_counts_PL)
        dist.all_to_all_single(recv_counts_PL, send_counts_PL, group=self.group)
        send_splits, recv_splits = torch.stack((send_counts_PL.sum(1), recv_counts_PL.sum(1))).tolist()

        x_send_ND = x_TD.index_select(0, token_N)
        x_recv_RD = all_to_all(x_send_ND, recv_splits, send_splits, self.group)
        # Received rows are ordered by source rank, then local expert (each source sent its chunk sorted by slot).
        local_R = torch.repeat_interleave(
            torch.arange(n_local, device=x_TD.device).repeat(p),
            recv_counts_PL.reshape(-1),
            output_size=sum(recv_splits),
        )
        ones_R1 = torch.ones(local_R.shape[0], 1, dtype=x_TD.dtype, device=x_TD.device)
        # Weight 1 here, the routing weights on the source rank: their gradient then stays a local computation.
        y_recv_RD = moe_experts(x_recv_RD, local_R.unsqueeze(1), ones_R1, w13_local_L2FD, w2_local_LDF, backend)
        y_send_ND = all_to_all(y_recv_RD, send_splits, recv_splits, self.group)

        weight_N1 = topk_w_TK.reshape(-1)[order_N].unsqueeze(-1).to(y_send_ND.dtype)
        return torch.zeros_like(x_TD).index_add(0, token_N, y_send_ND * weight_N1)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, ep_size={self.ep_size}, ep_rank={self.ep_rank}"


# ---- sharding the model --------------------------------------------------------------------------------------------


def _moe_blocks(model: nn.Module) -> list[nn.Module]:
    from ernie_platform.models.moe import MoEBlock  # kernels/ does not import the model package at import time

    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def shard_experts(
    model: nn.Module,
    ep_group: ProcessGroup = None,
    placement_E: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None,
) -> nn.Module:
    """Keep only this rank's expert slots in every MoEBlock of `model` and set its `expert_parallel` hook.

    `placement_E`: one [E] permutation for every MoE layer, a sequence of them (one per MoE layer, in module order),
    or None for the identity. Every rank of `ep_group` must start from the same full weights (same seed or
    checkpoint) and pass the same placement. The expert parameters are replaced by new nn.Parameters: build the
    optimizer (or DeepSpeed engine) after this call.
    """
    blocks = _moe_blocks(model)
    if not blocks:
        raise ValueError("shard_experts: the model has no MoE layers")
    ep_size = dist.get_world_size(ep_group)
    cfg = getattr(model, "moe_cfg", None)
    if cfg is not None and cfg.expert_parallel_size not in (1, ep_size):
        raise ValueError(
            f"shard_experts: moe.expert_parallel_size={cfg.expert_parallel_size} but the EP group has {ep_size} ranks"
        )
    if placement_E is None or isinstance(placement_E, torch.Tensor):
        placements = [placement_E] * len(blocks)
    else:
        placements = list(placement_E)
        if len(placements) != len(blocks):
            raise ValueError(f"shard_experts: {len(placements)} placements for {len(blocks)} MoE layers")
    for block, placement in zip(blocks, placements):
        if block.expert_parallel is not None:
            raise ValueError("shard_experts: the model's experts are already sharded (call gather_experts first)")
        ep = ExpertParallel(block.num_experts, ep_group, placement).to(block.w13_E2FD.device)
        idx_L = ep.local_experts().to(block.w13_E2FD.device)
        with torch.no_grad():
            for name in ("w13_E2FD", "w2_EDF"):
                full = getattr(block, name)
                setattr(block, name, nn.Parameter(full.index_select(0, idx_L).clone(), full.requires_grad))
        block.expert_parallel = ep
    return model


def _gather_global(local_L: torch.Tensor, ep: ExpertParallel) -> torch.Tensor:
    """All-gather the [L, ...] shards of the EP group (slot order) and reorder to global expert order [E, ...]."""
    shards = [torch.empty_like(local_L) for _ in range(ep.ep_size)]
    dist.all_gather(shards, local_L.contiguous(), group=ep.group)
    slots_E = torch.cat(shards)
    return slots_E.index_select(0, ep.placement_E.to(slots_E.device))  # global e sits in slot placement_E[e]


def gather_experts(model: nn.Module, grads: bool = False) -> nn.Module:
    """Inverse of `shard_experts` (collective over each EP group): full global-order expert weights on every rank,
    hook removed, so a checkpoint saves in the published layout. With `grads`, gradients present on the shards are
    gathered too (used by the tests to compare against single-rank training)."""
    for block in _moe_blocks(model):
        ep = block.expert_parallel
        if ep is None:
            continue
        with torch.no_grad():
            for name in ("w13_E2FD", "w2_EDF"):
                shard = getattr(block, name)
                full = nn.Parameter(_gather_global(shard.detach(), ep), shard.requires_grad)
                if grads and shard.grad is not None:
                    full.grad = _gather_global(shard.grad, ep)
                setattr(block, name, full)
        block.expert_parallel = None
    return model


# ---- process groups and gradient reduction -------------------------------------------------------------------------


def new_expert_parallel_groups(ep_size: int) -> tuple[ProcessGroup, ProcessGroup]:
    """(ep_group, expert_dp_group) for this rank, DeepSpeed's layout: EP groups of consecutive ranks (the all-to-all
    stays inside a node when ep_size divides the node's GPU count); the expert-DP group of rank r is every rank with
    the same EP rank, {r' : r' ≡ r mod ep_size}. expert_dp_group is None when ep_size == world size (every expert has
    a single owner). Collective: every rank must call it, with the same ep_size."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_size:
        raise ValueError(f"expert parallelism: world size {world} is not divisible by expert_parallel_size={ep_size}")
    ep_group = dp_group = None
    for g in range(world // ep_size):  # every rank creates every group, in the same order (torch requirement)
        ranks = list(range(g * ep_size, (g + 1) * ep_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            ep_group = group
    if world // ep_size > 1:
        for j in range(ep_size):
            ranks = list(range(j, world, ep_size))
            group = dist.new_group(ranks)
            if rank in ranks:
                dp_group = group
    return ep_group, dp_group


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sharded expert weights (MoEBlocks with the EP hook set); everything else is replicated on every rank."""
    return [p for b in _moe_blocks(model) if b.expert_parallel is not None for p in (b.w13_E2FD, b.w2_EDF)]


def _allreduce_sum_(tensors: list[torch.Tensor], group: ProcessGroup) -> None:
    by_dtype: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for ts in by_dtype.values():  # one collective per dtype instead of one per tensor
        flat = _flatten_dense_tensors(ts)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for t, r in zip(ts, _unflatten_dense_tensors(flat, ts)):
            t.copy_(r)


@torch.no_grad()
def allreduce_gradients(
    model: nn.Module, world_group: ProcessGroup = None, expert_dp_group: ProcessGroup = None
) -> None:
    """Make every gradient equal to that of plain data-parallel training (EP=1) on the union of the ranks' batches.

    Objective: L = (1/W) Σ_r L_r, L_r the loss of rank r (mean over its local batch), W = world size.
    - Replicated parameters: rank r's backward gives ∂L_r/∂θ, so SUM over the world group, ÷ W.
    - Expert shards: the all-to-all backward already delivers to the owner of a slot the gradient of every loss in its
      EP group, Σ_{r∈EP} ∂L_r/∂w; SUM over the expert-DP group (the other EP groups' owners of the same slot) gives
      Σ_{all r} ∂L_r/∂w, ÷ W. (Equivalently: average over the expert-DP group, then ÷ ep_size.)
    `expert_dp_group` None means no expert data parallelism (ep_size == world size); it is *not* the world group,
    which would add up different experts' gradients. Parameters without a gradient count as zero.
    """
    world = dist.get_world_size(world_group)
    experts = expert_parameters(model)
    expert_ids = {id(p) for p in experts}
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # every rank must contribute the same tensors to the flat buffers
            p.grad = torch.zeros_like(p)
    dense = [p.grad for p in params if id(p) not in expert_ids]
    sharded = [p.grad for p in params if id(p) in expert_ids]
    if experts:
        ep_size = next(b.expert_parallel.ep_size for b in _moe_blocks(model) if b.expert_parallel is not None)
        dp_size = 1 if expert_dp_group is None else dist.get_world_size(expert_dp_group)
        if ep_size * dp_size != world:
            raise ValueError(
                f"allreduce_gradients: ep_size={ep_size} × expert-DP size={dp_size} != world size {world}; pass the "
                "expert_dp_group from new_expert_parallel_groups"
            )
    if world > 1:
        _allreduce_sum_(dense, world_group)
    if sharded and expert_dp_group is not None and dist.get_world_size(expert_dp_group) > 1:
        _allreduce_sum_(sharded, expert_dp_group)
    for g in dense + sharded:
        g.div_(world)


__all__ = [
    "ExpertParallel",
    "all_to_all",
    "allreduce_gradients",
    "expert_parameters",
    "experts_per_rank",
    "gather_experts",
    "identity_placement",
    "local_experts",
    "new_expert_parallel_groups",
    "shard_experts",
    "slot_location",
    "validate_placement",
]
