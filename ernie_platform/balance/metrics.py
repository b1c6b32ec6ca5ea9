"""Quality of a placement: device and node load balance, cross-node token traffic, migration cost.

Shapes: L layers, E logical experts, R physical slots, G devices (num_gpus), N nodes. Loads are token counts (or
any additive cost); an expert's load is split evenly over its replicas, as the placement assumes.
"""

from __future__ import annotations

import torch


def slot_loads(weight_LE: torch.Tensor, phy2log_LR: torch.Tensor) -> torch.Tensor:
    """[L, R] load of each physical slot: the expert's load divided by its replica count."""
    w = weight_LE.double()  # double: token counts in the millions, and ratios compared across placements
    logcnt_LE = torch.zeros_like(w).scatter_add_(1, phy2log_LR, torch.ones_like(phy2log_LR, dtype=w.dtype))
    return (w / logcnt_LE.clamp_min(1)).gather(1, phy2log_LR)


def device_loads(weight_LE: torch.Tensor, phy2log_LR: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """[L, G] load of each device."""
    s = slot_loads(weight_LE, phy2log_LR)
    return s.view(s.shape[0], num_gpus, -1).sum(-1)


def node_loads(weight_LE: torch.Tensor, phy2log_LR: torch.Tensor, num_gpus: int, num_nodes: int) -> torch.Tensor:
    """[L, N] load of each node."""
    d = device_loads(weight_LE, phy2log_LR, num_gpus)
    return d.view(d.shape[0], num_nodes, -1).sum(-1)


def max_over_mean(loads_LX: torch.Tensor) -> torch.Tensor:
    """[L] max/mean per layer (1.0 for an empty layer)."""
    mean = loads_LX.mean(-1)
    return torch.where(mean > 0, loads_LX.max(-1).values / mean.clamp_min(1e-30), torch.ones_like(mean))


def cross_node_traffic(
    weight_LE: torch.Tensor, phy2log_LR: torch.Tensor, num_gpus: int, num_nodes: int
) -> torch.Tensor:
    """[L] fraction of (token, expert) assignments served on another node than the token's.

    Tokens originate uniformly over devices (so over nodes); a token whose expert has a replica on its own node uses
    that one, otherwise it crosses nodes: traffic = sum_e w_e (1 - n_e / N) / sum_e w_e, n_e = nodes holding e.
    """
    L, E = weight_LE.shape
    node_of_slot_R = torch.arange(phy2log_LR.shape[1]) // (phy2log_LR.shape[1] // num_gpus) // (num_gpus // num_nodes)
    present_LEN = torch.zeros(L, E, num_nodes, dtype=torch.bool)
    present_LEN[torch.arange(L)[:, None], phy2log_LR, node_of_slot_R[None].expand(L, -1)] = True
    n_e = present_LEN.sum(-1).float()
    w = weight_LE.double()
    total = w.sum(-1).clamp_min(1e-30)
    return (w * (1 - n_e / num_nodes)).sum(-1) / total


def off_group_node_traffic(
    weight_LE: torch.Tensor, phy2log_LR: torch.Tensor, num_groups: int, num_gpus: int, num_nodes: int
) -> torch.Tensor:
    """[L] fraction of tokens served outside their expert group's home node (the node serving most of the group).

    0 for the hierarchical policy. With node-limited (group-limited) routing, or dispatch that sends a token once per
    destination node, each such token costs an extra node hop: this is what balancing across nodes costs.
    """
    L, E = weight_LE.shape
    R = phy2log_LR.shape[1]
    s_LR = slot_loads(weight_LE, phy2log_LR)
    node_of_slot_R = (torch.arange(R) // (R // num_gpus) // (num_gpus // num_nodes)).expand(L, -1)
    group_LR = phy2log_LR // (E // num_groups)
    load_LGN = torch.zeros(L, num_groups * num_nodes, dtype=s_LR.dtype)
    load_LGN.scatter_add_(1, group_LR * num_nodes + node_of_slot_R, s_LR)
    load_LGN = load_LGN.view(L, num_groups, num_nodes)
    home_load = load_LGN.max(-1).values.sum(-1)
    total = s_LR.sum(-1).clamp_min(1e-30)
    return (1 - home_load / total).clamp_min(0)


def migration_cost(prev_phy2log_LR: torch.Tensor, phy2log_LR: torch.Tensor, expert_bytes: int = 0) -> dict:
    """Slots whose logical expert changed between two placements (each needs that expert's parameters and
    optimizer state copied in): per layer, total, and bytes when ``expert_bytes`` (per expert) is given."""
    changed_L = (prev_phy2log_LR != phy2log_LR).sum(-1)
    total = int(changed_L.sum())
    return {"slots_changed_L": changed_L, "slots_changed": total, "bytes": total * int(expert_bytes)}


def summarize(
    weight_LE: torch.Tensor,
    phy2log_LR: torch.Tensor,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    prev_phy2log_LR: torch.Tensor | None = None,
    expert_bytes: int = 0,
) -> dict:
    """All metrics of a placement: per-layer tensors ([L]) and their means."""
    dev_L = max_over_mean(device_loads(weight_LE, phy2log_LR, num_gpus))
    node_L = max_over_mean(node_loads(weight_LE, phy2log_LR, num_gpus, num_nodes))
    cross_L = cross_node_traffic(weight_LE, phy2log_LR, num_gpus, num_nodes)
    off_L = off_group_node_traffic(weight_LE, phy2log_LR, num_groups, num_gpus, num_nodes)
    out = {
        "device_max_mean_L": dev_L,
        "node_max_mean_L": node_L,
        "cross_node_L": cross_L,
        "off_group_node_L": off_L,
        "device_max_mean": float(dev_L.mean()),
        "node_max_mean": float(node_L.mean()),
        "cross_node": float(cross_L.mean()),
        "off_group_node": float(off_L.mean()),
    }
    if prev_phy2log_LR is not None:
        mig = migration_cost(prev_phy2log_LR, phy2log_LR, expert_bytes)
        out["migration_L"] = mig["slots_changed_L"]
        out["migration_slots"] = mig["slots_changed"]
        out["migration_bytes"] = mig["bytes"]
    return out
