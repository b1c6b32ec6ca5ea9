"""Gradient reduction under expert parallelism: process groups, replica gradient sums, the de-duplicated expert
gradient norm and the all-reduce that reproduces data-parallel gradients. Derivation in kernels/expert_parallel.py
and docs/kernels.md ("Gradients")."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

ProcessGroup = Optional[dist.ProcessGroup]  # None: the default (world) group, as in torch.distributed


def _moe_blocks(model: nn.Module) -> list[nn.Module]:
    from ernie_platform.models.moe import (
        MoEBlock,  # ernie_platform/kernels/ does not import the model package at import time
    )

    return [m for m in model.modules() if isinstance(m, MoEBlock)]


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
def sync_replica_gradients(model: nn.Module) -> None:
    """Sum the gradients of each replicated expert over its slots in the EP group and give every replica the sum
    (collective over each EP group; nothing to do without replicas). After this, replicas of one expert hold equal
    gradients, the gradient that expert would have had alone, so equal weights and optimizer states stay equal."""
    # Per replicated slot held here: its row in the shard (`slot_R`) and its expert's row in the buffer (`rep_R`).
    synced: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (grad, buffer, slot_R, rep_R)
    by_group: dict[int, tuple[ProcessGroup, list[torch.Tensor]]] = {}
    for block in _moe_blocks(model):
        ep = block.expert_parallel
        if ep is None or not ep.replicated:
            continue
        hot = torch.nonzero(ep.logcnt_E.cpu() > 1).flatten()
        rep_E = torch.full((ep.num_experts,), -1, dtype=torch.long)
        rep_E[hot] = torch.arange(hot.numel())
        rep_L = rep_E[ep.local_experts()]
        slot_R = torch.nonzero(rep_L >= 0).flatten()
        rep_R = rep_L[slot_R]
        for param in (block.w13_E2FD, block.w2_EDF):
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            slots, reps = slot_R.to(param.device), rep_R.to(param.device)
            buf = param.grad.new_zeros((hot.numel(),) + tuple(param.shape[1:]))
            buf.index_add_(0, reps, param.grad.index_select(0, slots))
            synced.append((param.grad, buf, slots, reps))
            by_group.setdefault(id(ep.group), (ep.group, []))[1].append(buf)
    for group, bufs in by_group.values():
        _allreduce_sum_(bufs, group)
    for grad, buf, slots, reps in synced:
        grad.index_copy_(0, slots, buf.index_select(0, reps))


def expert_grad_sq_sum(model: nn.Module) -> torch.Tensor:
    """This rank's share of the squared gradient norm of the sharded expert weights, fp64: each slot weighted by
    1 / (replicas of its expert), so that the sum over the EP group counts every logical expert once."""
    total = torch.zeros((), dtype=torch.float64)
    for block in _moe_blocks(model):
        ep = block.expert_parallel
        if ep is None:
            continue
        weight_L = 1.0 / ep.logcnt_E.cpu()[ep.local_experts()].double()
        for param in (block.w13_E2FD, block.w2_EDF):
            if param.grad is not None:
                total += (param.grad.detach().double().pow(2).flatten(1).sum(1).cpu() * weight_L).sum()
    return total


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
    - Replicated experts (slot tables with S > E): first summed over their slots (`sync_replica_gradients`).
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
    if experts:
        sync_replica_gradients(model)
    if world > 1:
        _allreduce_sum_(dense, world_group)
    if sharded and expert_dp_group is not None and dist.get_world_size(expert_dp_group) > 1:
        _allreduce_sum_(sharded, expert_dp_group)
    for g in dense + sharded:
        g.div_(world)
