"""Expert placement in the pretraining loop under expert parallelism (`moe.expert_parallel_size` > 1).

Shapes: L MoE layers, E experts per layer, S physical slots per layer (E + `moe.num_redundant_experts`), G devices
(ranks) in an expert-parallel group.

* Start: the identity placement, or with redundant slots the contiguous one (slot s holds expert s mod E, so the
  first experts get the spare replicas) until the first re-plan.
* Loads: every micro-batch's routed (token, k) counts per layer and expert (`MoEBlock.last_expert_load_E`) are
  summed on each rank since the last plan.
* Re-plan every `moe.rebalance_interval` optimizer steps: the loads summed over all ranks go through
  `ernie_platform.balance.rebalance_experts` (`moe.placement_policy`, the EP group as `num_gpus` devices on
  `num_nodes` nodes), the result is renumbered to move as few experts as possible (`balance.align_to_previous`),
  broadcast from rank 0 (every EP group must hold the same slots: the expert-data-parallel all-reduce adds slot to
  slot), and `kernels.expert_parallel.apply_placement` moves the weights and the AdamW moments in place. The model's
  function does not depend on the placement, so the loss curve is the one of a run that never moves.
* Checkpoints: DeepSpeed (ZeRO stage 0) writes rank 0's module and optimizer state only, which would hand every rank
  rank 0's expert shards on resume. Each rank therefore also writes `experts_rank{r}.pt` (its shards, their optimizer
  moments, the slot tables and the loads since the last plan) and reads it back after DeepSpeed's load.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

EXPERT_FILE = "experts_rank{rank}.pt"


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    from ernie_platform.models.moe import MoEBlock

    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def initial_tables(num_layers: int, num_experts: int, num_slots: int) -> Optional[torch.Tensor]:
    """phy2log [L, S] before any load is known (None: the identity, no replicas)."""
    if num_slots == num_experts:
        return None
    from ernie_platform.balance import contiguous_placement

    return contiguous_placement(num_layers, num_experts, num_slots)


def cluster_shape(ep_size: int, local_world_size: int, num_experts: int, policy: str) -> tuple[int, int, str]:
    """(num_nodes, num_groups, policy) for the placement of one EP group of consecutive ranks.

    Nodes: the EP group spans ep_size / local_world_size nodes when whole nodes fit in it, else it is treated as one
    node. Groups: one contiguous expert group per node (the hierarchical policies pack groups onto nodes); when E is
    not divisible by the node count there are no such groups, and the global policy is used."""
    nodes = ep_size // local_world_size if local_world_size and ep_size % local_world_size == 0 else 1
    nodes = max(nodes, 1)
    if policy != "global" and num_experts % nodes:
        log.warning(
            "expert placement: %d experts do not split into %d node groups; using the global policy", num_experts, nodes
        )
        return nodes, 1, "global"
    return nodes, nodes, policy


class ExpertPlacement:
    """The placement state of one worker: loads since the last plan, re-planning, and its checkpoint file."""

    def __init__(self, model: torch.nn.Module, moe_cfg: dict[str, Any], ep_size: int, local_world_size: int):
        blocks = _blocks(model)
        self.num_layers = len(blocks)
        self.num_experts = blocks[0].num_experts
        self.num_slots = self.num_experts + int(moe_cfg.get("num_redundant_experts") or 0)
        self.interval = int(moe_cfg.get("rebalance_interval") or 0)
        self.ep_size = ep_size
        self.num_nodes, self.num_groups, self.policy = cluster_shape(
            ep_size, local_world_size, self.num_experts, str(moe_cfg.get("placement_policy") or "hierarchical")
        )
        self.loads_LE = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
        self.plans = 0

    def tables(self, model: torch.nn.Module) -> torch.Tensor:
        from ernie_platform.kernels.expert_parallel import placement_tables

        return torch.stack(placement_tables(model))

    def stack(self, loads: dict[str, torch.Tensor]) -> torch.Tensor:
        """[L, E] float64 from the training loop's per-layer loads {"layer{i}": [E]}."""
        return torch.stack([loads[f"layer{i}"].detach().double().cpu() for i in range(self.num_layers)])

    def record(self, loads: dict[str, torch.Tensor]) -> None:
        """Add one forward's routed counts (this rank's tokens; the loop's {"layer{i}": [E]}) to the loads since the
        last plan."""
        self.loads_LE += self.stack(loads)

    def device_imbalance(self, loads_LE: torch.Tensor, phy2log_LS: torch.Tensor) -> float:
        """Mean over layers of max/mean load of the EP group's devices for these loads under this placement."""
        from ernie_platform.balance import device_loads, max_over_mean

        if float(loads_LE.sum()) == 0:
            return 1.0
        return float(max_over_mean(device_loads(loads_LE, phy2log_LS, self.ep_size)).mean())

    def due(self, step: int, max_steps: int) -> bool:
        return self.interval > 0 and step % self.interval == 0 and step < max_steps

    def rebalance(self, model: torch.nn.Module, optimizer: Any) -> dict[str, float]:
        """Collective over all ranks: re-plan from the loads since the last plan and move the experts."""
        from ernie_platform.balance import align_to_previous, rebalance_experts
        from ernie_platform.kernels.expert_parallel import apply_placement

        loads_LE = self.loads_LE.clone()
        dist.all_reduce(loads_LE)
        old_LS = self.tables(model)
        new_LS, _, _ = rebalance_experts(
            loads_LE.float(), self.num_slots, self.num_groups, self.num_nodes, self.ep_size, self.policy
        )
        new_LS = align_to_previous(new_LS, old_LS, self.ep_size, self.num_nodes)
        dist.broadcast(new_LS, src=0)  # one plan for every EP group, whatever the ranks' float summation order
        moved = apply_placement(model, new_LS, optimizer)
        self.loads_LE.zero_()
        self.plans += 1
        return {
            "balance/slots_moved": float(moved),
            "balance/device_imbalance_before": self.device_imbalance(loads_LE, old_LS),
            "balance/device_imbalance_after": self.device_imbalance(loads_LE, new_LS),
        }

    # ---- checkpoint ------------------------------------------------------------------------------------------------

    def save(self, model: torch.nn.Module, optimizer: Any, directory: Path, rank: int) -> None:
        from ernie_platform.kernels.expert_parallel import expert_parameters, optimizer_moments

        names = {id(p): n for n, p in model.named_parameters()}
        params, moments = {}, {}
        for p in expert_parameters(model):
            params[names[id(p)]] = p.detach().clone()
            moments[names[id(p)]] = {k: v.clone() for k, v in optimizer_moments(optimizer, p).items()}
        torch.save(
            {"phy2log_LS": self.tables(model), "loads_LE": self.loads_LE, "params": params, "moments": moments},
            Path(directory) / EXPERT_FILE.format(rank=rank),
        )

    @torch.no_grad()
    def load(self, model: torch.nn.Module, optimizer: Any, directory: Path, rank: int) -> None:
        from ernie_platform.kernels.expert_parallel import optimizer_state

        path = Path(directory) / EXPERT_FILE.format(rank=rank)
        if not path.is_file():
            raise RuntimeError(
                f"checkpoint {directory} has no {path.name}: it was not written by an expert-parallel run with this "
                "number of workers, so this rank's expert shards cannot be restored"
            )
        data = torch.load(path, map_location="cpu", weights_only=True)
        for block, row in zip([b for b in _blocks(model) if b.expert_parallel is not None], data["phy2log_LS"]):
            block.expert_parallel.set_tables(row)
        self.loads_LE.copy_(data["loads_LE"])
        named = dict(model.named_parameters())
        for name, value in data["params"].items():
            if name not in named or named[name].shape != value.shape:
                raise RuntimeError(f"{path}: expert parameter {name} {tuple(value.shape)} does not fit this model")
            named[name].copy_(value)
            state = optimizer_state(optimizer, named[name])
            for k, v in data["moments"][name].items():
                if isinstance(state.get(k), torch.Tensor):
                    state[k].copy_(v)
                else:
                    state[k] = v.clone()


__all__ = ["EXPERT_FILE", "ExpertPlacement", "cluster_shape", "initial_tables"]
