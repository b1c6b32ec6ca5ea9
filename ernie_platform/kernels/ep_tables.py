"""Expert-parallel slot tables: which physical slot (hence which EP rank) holds which expert. Pure tensor math, no
collectives; the shape legend and the placement rules are in ernie_platform/kernels/expert_parallel.py."""

from __future__ import annotations

from typing import Union

import torch


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


def validate_phy2log(phy2log_S: torch.Tensor, num_experts: int, ep_size: int) -> torch.Tensor:
    """Check a slot table: S >= E slots, S divisible by the EP size, ids in [0, E), every expert in at least one
    slot. Returns it as int64 CPU."""
    p = torch.as_tensor(phy2log_S).detach().to("cpu", torch.long)
    if p.dim() != 1 or p.numel() < num_experts:
        raise ValueError(
            f"expert parallelism: phy2log must be 1-D with at least moe_num_experts={num_experts} slots, "
            f"got shape {tuple(p.shape)}"
        )
    if p.numel() % ep_size:
        raise ValueError(
            f"expert parallelism: {p.numel()} expert slots (moe_num_experts + moe.num_redundant_experts) are not "
            f"divisible by expert_parallel_size={ep_size}; every EP rank must hold the same number of slots"
        )
    if p.min() < 0 or p.max() >= num_experts:
        raise ValueError(f"expert parallelism: phy2log holds ids outside [0, {num_experts}): {p.tolist()}")
    missing = sorted(set(range(num_experts)) - set(p.tolist()))
    if missing:
        raise ValueError(f"expert parallelism: experts {missing} have no slot in phy2log {p.tolist()}")
    return p


def replica_tables(phy2log_S: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log2phy_EX padded with -1, logcnt_E) of one layer's slot table; slots of an expert in increasing order."""
    logcnt_E = torch.bincount(phy2log_S, minlength=num_experts)
    order_S = torch.argsort(phy2log_S, stable=True)  # slots grouped by expert, increasing within an expert
    starts_E = torch.cumsum(logcnt_E, 0) - logcnt_E
    rank_S = torch.arange(phy2log_S.numel()) - starts_E[phy2log_S[order_S]]
    log2phy_EX = torch.full((num_experts, int(logcnt_E.max())), -1, dtype=torch.long)
    log2phy_EX[phy2log_S[order_S], rank_S] = order_S
    return log2phy_EX, logcnt_E
