"""Expert parallelism (EP): each MoE layer's experts split across the ranks of an EP process group.

Shape legend (suffixes on tensor names), as in ernie_platform/kernels/moe.py:
    T  tokens on this rank         D  model (hidden) width
    K  experts chosen per token    E  experts in the pool (global)
    F  expert FFN width            N  routed (token, k) pairs sent by this rank = T * K
    P  ranks in the EP group       S  physical expert slots in the group (S >= E; S > E: replicas)
    L  slots per rank = S / P      X  max replicas of one expert (log2phy's padded width)
    R  routed pairs received by this rank (from all P ranks)

Placement (the load-balancing issue's EPLB tables, one layer): `phy2log_S[s]` is the logical (global) expert held
by physical slot s; slot s lives on EP rank s // L at local index s % L. `log2phy_EX[e]` lists e's slots (-1 padded),
`logcnt_E[e]` how many. Without replicas (S == E) a placement is a permutation, also given as `placement_E[e]` = the
slot of expert e; the identity puts experts [r·L, (r+1)·L) on rank r. With replicas a hot expert lives in several
slots (on several ranks) and its (token, k) pairs are split evenly over them: on each source rank the i-th pair of
expert e (in token order) goes to replica (i + rank) mod logcnt_E[e]. Replicas hold identical weights and optimizer
state: their gradients are summed over the replicas (`sync_replica_gradients`) before the optimizer step, so they
stay equal. The model's numerics do not depend on the placement — only where the compute happens.

Forward of one MoE layer (the router has already run, replicated, on this rank's T tokens; ids are global):
    global id → slot → (destination rank, local id); the N pairs sorted by slot, hence grouped by destination rank
    counts:  all_to_all_single of the [P, L] per-(rank, local expert) pair counts, so every rank learns how many rows
             it will receive from each source and for which of its local experts (no expert ids travel with rows)
    dispatch: differentiable all-to-all of the N token rows (x) → R rows on the ranks holding their experts
    experts: kernels.moe.moe_experts on the R rows with local slot ids and weight 1 (unweighted expert outputs)
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
every gradient is: all-reduce SUM over the ranks holding a replica of the tensor, then divide by W (replicated
experts: first SUM over the expert's slots in the EP group).

Re-placement (`apply_placement`, used by `moe.rebalance_interval`): all-gather each expert tensor — the weights and
the optimizer's per-parameter state of the same shape (AdamW's moments) — in slot order, pick each logical expert
from one of its old slots, and copy the new placement's rows into the same parameter storage in place, so the
optimizer (and DeepSpeed's references to the parameters) keep working and the next step is the one that would
have run without the move. Cost per MoE layer: one all-gather of the full expert weights and of each moment.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ernie_platform.kernels.ep_gradients import (
    _moe_blocks,
    allreduce_gradients,
    expert_grad_sq_sum,
    expert_parameters,
    new_expert_parallel_groups,
    sync_replica_gradients,
)
from ernie_platform.kernels.ep_tables import (
    experts_per_rank,
    identity_placement,
    local_experts,
    replica_tables,
    slot_location,
    validate_phy2log,
    validate_placement,
)
from ernie_platform.kernels.moe import moe_experts

ProcessGroup = Optional[dist.ProcessGroup]  # None: the default (world) group, as in torch.distributed

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
    """Set as `MoEBlock.expert_parallel`: routes the block's (token, k) pairs to the ranks holding their experts.

    Give either `placement_E` (a permutation: the slot of each expert, no replicas) or `phy2log_S` (the logical
    expert of each of S >= E slots; replicas allowed); neither means the identity placement.
    """

    def __init__(
        self,
        num_experts: int,
        group: ProcessGroup = None,
        placement_E: Optional[torch.Tensor] = None,
        phy2log_S: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.num_experts = num_experts
        if placement_E is not None and phy2log_S is not None:
            raise ValueError("ExpertParallel: give placement_E or phy2log_S, not both")
        if phy2log_S is None:
            if placement_E is None:
                placement_E = identity_placement(num_experts)
            phy2log_S = torch.argsort(validate_placement(placement_E, num_experts, self.ep_size))
        # Not persistent: checkpoints are saved gathered, in the published global layout (see gather_experts); the
        # training loop keeps the tables in its own per-rank checkpoint file.
        self.register_buffer("phy2log_S", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("log2phy_EX", torch.empty(0, 1, dtype=torch.long), persistent=False)
        self.register_buffer("logcnt_E", torch.empty(0, dtype=torch.long), persistent=False)
        self.set_tables(phy2log_S)

    def set_tables(self, phy2log_S: torch.Tensor) -> None:
        """Install a slot table (same slot count); moves no weights — see `apply_placement` for that."""
        p = validate_phy2log(phy2log_S, self.num_experts, self.ep_size)
        if self.phy2log_S.numel() and p.numel() != self.phy2log_S.numel():
            raise ValueError(f"expert parallelism: {p.numel()} slots given, the shards hold {self.phy2log_S.numel()}")
        log2phy_EX, logcnt_E = replica_tables(p, self.num_experts)
        device = self.phy2log_S.device
        self.phy2log_S, self.log2phy_EX, self.logcnt_E = p.to(device), log2phy_EX.to(device), logcnt_E.to(device)
        self.num_slots = p.numel()
        self.num_local = self.num_slots // self.ep_size
        self.replicated = self.num_slots > self.num_experts

    @property
    def placement_E(self) -> torch.Tensor:
        """Each expert's first slot (for a permutation: its only one)."""
        return self.log2phy_EX[:, 0]

    def local_experts(self) -> torch.Tensor:
        """Logical ids of this rank's slots, in local order: the rows of its weight shards."""
        return self.phy2log_S[self.ep_rank * self.num_local : (self.ep_rank + 1) * self.num_local].cpu()

    def _slots(self, topk_idx_TK: torch.Tensor) -> torch.Tensor:
        """The physical slot of each (token, k) pair: the expert's slot, or one of its replicas in turn."""
        device = topk_idx_TK.device
        if not self.replicated:
            return self.placement_E.to(device)[topk_idx_TK]
        idx_N = topk_idx_TK.reshape(-1)
        order_N = torch.argsort(idx_N, stable=True)
        count_E = torch.bincount(idx_N, minlength=self.num_experts)
        start_E = torch.cumsum(count_E, 0) - count_E
        pos_N = torch.empty_like(idx_N)
        pos_N[order_N] = torch.arange(idx_N.numel(), device=device) - start_E[idx_N[order_N]]
        replica_N = (pos_N + self.ep_rank) % self.logcnt_E.to(device)[idx_N]
        return self.log2phy_EX.to(device)[idx_N, replica_N].view_as(topk_idx_TK)

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
        slot_TK = self._slots(topk_idx_TK)
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
        send_counts_PL = torch.bincount(slot_N, minlength=self.num_slots).view(p, n_local)
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
        return (
            f"num_experts={self.num_experts}, num_slots={self.num_slots}, ep_size={self.ep_size}, "
            f"ep_rank={self.ep_rank}"
        )


# ---- sharding the model --------------------------------------------------------------------------------------------


def _per_layer(tables: Any, n_layers: int, what: str) -> list[Optional[torch.Tensor]]:
    """One table for every layer ([X] tensor or None), one row per layer ([L, X] tensor), or a sequence of them."""
    if tables is None or (isinstance(tables, torch.Tensor) and tables.dim() == 1):
        return [tables] * n_layers
    rows = list(tables)
    if len(rows) != n_layers:
        raise ValueError(f"expert parallelism: {len(rows)} {what} rows for {n_layers} MoE layers")
    return [torch.as_tensor(r) for r in rows]


def shard_experts(
    model: nn.Module,
    ep_group: ProcessGroup = None,
    placement_E: Any = None,
    phy2log: Any = None,
) -> nn.Module:
    """Keep only this rank's expert slots in every MoEBlock of `model` and set its `expert_parallel` hook.

    `placement_E` (permutations, no replicas) or `phy2log` (slot tables [S], S >= E, replicas allowed): one for every
    MoE layer, one row per layer ([L, ·] or a sequence, in module order), or None for the identity. Every rank of
    `ep_group` must start from the same full weights (same seed or checkpoint) and pass the same tables. The expert
    parameters are replaced by new nn.Parameters: build the optimizer (or DeepSpeed engine) after this call.
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
    placements = _per_layer(placement_E, len(blocks), "placement_E")
    slot_tables = _per_layer(phy2log, len(blocks), "phy2log")
    for block, placement, slots in zip(blocks, placements, slot_tables):
        if block.expert_parallel is not None:
            raise ValueError("shard_experts: the model's experts are already sharded (call gather_experts first)")
        ep = ExpertParallel(block.num_experts, ep_group, placement, slots).to(block.w13_E2FD.device)
        idx_L = ep.local_experts().to(block.w13_E2FD.device)
        with torch.no_grad():
            for name in ("w13_E2FD", "w2_EDF"):
                full = getattr(block, name)
                setattr(block, name, nn.Parameter(full.index_select(0, idx_L).clone(), full.requires_grad))
        block.expert_parallel = ep
    return model


def placement_tables(model: nn.Module) -> list[torch.Tensor]:
    """The current slot table phy2log [S] of every sharded MoE layer, in module order."""
    return [b.expert_parallel.phy2log_S.cpu().clone() for b in _moe_blocks(model) if b.expert_parallel is not None]


def _gather_global(local_L: torch.Tensor, ep: ExpertParallel) -> torch.Tensor:
    """All-gather the [L, ...] shards of the EP group (slot order) and reorder to global expert order [E, ...]."""
    shards = [torch.empty_like(local_L) for _ in range(ep.ep_size)]
    dist.all_gather(shards, local_L.contiguous(), group=ep.group)
    slots_S = torch.cat(shards)
    return slots_S.index_select(0, ep.placement_E.to(slots_S.device))  # e's first slot (replicas are equal)


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


# ---- re-placement --------------------------------------------------------------------------------------------------


def optimizer_state(optimizer: Any, param: torch.Tensor) -> dict[str, Any]:
    """`optimizer.state[param]` of a torch optimizer, unwrapping DeepSpeed's / other wrappers' `.optimizer`."""
    while optimizer is not None and not hasattr(optimizer, "state") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if optimizer is None:
        return {}
    return optimizer.state[param]


def optimizer_moments(optimizer: Any, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-parameter optimizer state tensors shaped like `param` (AdamW: exp_avg, exp_avg_sq), by state key."""
    state = optimizer_state(optimizer, param)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == param.shape}


@torch.no_grad()
def apply_placement(model: nn.Module, phy2log: Any, optimizer: Any = None) -> int:
    """Move every sharded MoE layer to new slot tables (collective over each EP group; every rank passes the same
    tables, one row per MoE layer, the same slot count as now). The weights, their gradients if present and the
    optimizer's same-shaped state follow their expert; parameters are updated in place. Returns how many
    (layer, slot) entries changed expert on this EP group — the migration."""
    blocks = [b for b in _moe_blocks(model) if b.expert_parallel is not None]
    rows = _per_layer(phy2log, len(blocks), "phy2log")
    moved = 0
    for block, row in zip(blocks, rows):
        ep = block.expert_parallel
        new_S = validate_phy2log(row, ep.num_experts, ep.ep_size)
        if new_S.numel() != ep.num_slots:
            raise ValueError(f"apply_placement: {new_S.numel()} slots given, the layer has {ep.num_slots}")
        old_S = ep.phy2log_S.cpu()
        moved += int((new_S != old_S).sum())
        if torch.equal(new_S, old_S):
            continue
        lo = ep.ep_rank * ep.num_local
        new_local_L = new_S[lo : lo + ep.num_local]
        for name in ("w13_E2FD", "w2_EDF"):
            param = getattr(block, name)
            tensors = [param, *optimizer_moments(optimizer, param).values()]
            if param.grad is not None:
                tensors.append(param.grad)
            for t in tensors:  # each expert read from one of its old slots (replicas hold the same values)
                t.copy_(_gather_global(t, ep).index_select(0, new_local_L.to(t.device)))
        ep.set_tables(new_S)
    return moved


__all__ = [
    "ExpertParallel",
    "all_to_all",
    "allreduce_gradients",
    "apply_placement",
    "expert_grad_sq_sum",
    "expert_parameters",
    "experts_per_rank",
    "gather_experts",
    "identity_placement",
    "local_experts",
    "new_expert_parallel_groups",
    "optimizer_moments",
    "optimizer_state",
    "placement_tables",
    "replica_tables",
    "shard_experts",
    "slot_location",
    "sync_replica_gradients",
    "validate_phy2log",
    "validate_placement",
]
