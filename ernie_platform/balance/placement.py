"""Expert placement and replication across nodes × devices (DeepSeek EPLB's interface, our own implementation).

Tensor names carry their shape; legend:
    L  layers                  E  logical experts of one layer (one pool)
    R  physical slots (replicas) of one layer, over all devices
    X  max replicas of one expert (the padding width of log2phy, R - E + 1 as in EPLB)

Slot ``r`` of device ``g`` is physical slot ``g * (R // num_gpus) + r``; devices ``n * (num_gpus // num_nodes)`` ...
belong to node ``n``. Every logical expert has at least one replica, and an expert's tokens are split evenly over
its replicas.

Policies:
  * ``hierarchical`` -- EPLB's: expert groups packed onto nodes (balanced packing), hot experts replicated inside
    each node (each extra replica to the expert with the largest per-replica load), replicas packed onto the node's
    devices. Ours refines every step (pairwise swaps after greedy packing, replica counts capped at multiples of the
    devices per node, a hill-climb on the counts) and accepts a change only when it lowers the hottest device, so it
    is never worse than EPLB's greedy (``refine=False``) on any layer.
  * ``global`` -- ignores groups and nodes: replicate over all slots, pack onto all devices.
  * ``traffic_aware`` -- hierarchical when that is balanced enough (max/mean device load <= ``max_imbalance``);
    otherwise replicas are replicated globally and placed on their group's home node while it stays under a node
    load cap, spilling the rest to the least loaded nodes; of the caps tried it keeps the one with the least
    spilled traffic that meets ``max_imbalance`` (or the most balanced one).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch

POLICIES = ("hierarchical", "global", "traffic_aware")

# Node load caps (relative to the mean node load) the traffic-aware policy tries, loosest first, so that the first
# one meeting max_imbalance is the one spilling the fewest tokens off their group's node.
_SPILL_SLACKS = (0.3, 0.2, 0.12, 0.08, 0.05, 0.03, 0.02, 0.01, 0.0)


def balanced_packing(weights: Sequence[float], num_packs: int, refine: bool = True) -> list[int]:
    """Pack ``len(weights)`` items into ``num_packs`` packs of equal item count, minimising the heaviest pack.

    Greedy (heaviest item first into the lightest non-full pack, as EPLB does), then pairwise swaps between the
    heaviest pack and the others while a swap lowers the pair's max: swaps keep the item counts, and each accepted
    swap strictly lowers the heaviest pack or the number of packs at that load, so the result is never worse than
    the greedy one. Returns the pack of each item.
    """
    n = len(weights)
    assert n % num_packs == 0, f"{n} items do not split evenly into {num_packs} packs"
    per_pack = n // num_packs
    pack_of = [0] * n
    if num_packs == 1:
        return pack_of
    load = [0.0] * num_packs
    count = [0] * num_packs
    members: list[list[int]] = [[] for _ in range(num_packs)]
    for i in sorted(range(n), key=lambda j: -weights[j]):
        p = min((q for q in range(num_packs) if count[q] < per_pack), key=lambda q: load[q])
        pack_of[i] = p
        load[p] += weights[i]
        count[p] += 1
        members[p].append(i)
    if not refine:
        return pack_of
    for _ in range(4 * n):
        hot = max(range(num_packs), key=lambda q: load[q])
        best = (load[hot] * (1 - 1e-9), -1, -1, -1)  # (new pair max, item in hot, other pack, item in other)
        for q in range(num_packs):
            if q == hot:
                continue
            for a_idx, a in enumerate(members[hot]):
                for b_idx, b in enumerate(members[q]):
                    d = weights[a] - weights[b]
                    if d <= 0:
                        continue
                    new_max = max(load[hot] - d, load[q] + d)
                    if new_max < best[0]:
                        best = (new_max, a_idx, q, b_idx)
        if best[1] < 0:
            break
        _, a_idx, q, b_idx = best
        a, b = members[hot][a_idx], members[q][b_idx]
        d = weights[a] - weights[b]
        members[hot][a_idx], members[q][b_idx] = b, a
        pack_of[a], pack_of[b] = q, hot
        load[hot] -= d
        load[q] += d
    return pack_of


def replicate(weights: Sequence[float], num_slots: int, cap: int | None = None) -> list[int]:
    """Replica count per expert: one each, then every extra slot to the expert with the largest per-replica load
    (among those below ``cap`` replicas, when given).

    Uncapped, this greedy minimises the largest per-replica load for the slot count (EPLB's replication).
    """
    n = len(weights)
    assert num_slots >= n, f"{num_slots} slots cannot hold {n} experts"
    if cap is not None and cap * n < num_slots:
        raise ValueError(f"cap {cap} × {n} experts < {num_slots} slots")
    count = [1] * n
    heap = [(-float(w), i) for i, w in enumerate(weights) if cap is None or cap > 1]
    heapq.heapify(heap)
    for _ in range(num_slots - n):
        _, i = heapq.heappop(heap)
        count[i] += 1
        if cap is None or count[i] < cap:
            heapq.heappush(heap, (-float(weights[i]) / count[i], i))
    return count


def _pack_onto_devices(
    replicas: list[int], weights: Sequence[float], count: Sequence[int], num_devices: int
) -> list[list[int]]:
    """Pack replicas (a list of expert ids, one entry per replica) onto devices; returns each device's expert ids."""
    rep_load = [weights[e] / count[e] for e in replicas]
    pack_of = balanced_packing(rep_load, num_devices)
    devices: list[list[int]] = [[] for _ in range(num_devices)]
    for e, p in zip(replicas, pack_of):
        devices[p].append(e)
    return devices


def _device_max(devices: list[list[int]], weights: Sequence[float], count: Sequence[int]) -> float:
    return max(sum(weights[e] / count[e] for e in dev) for dev in devices)


def _replicate_and_pack(
    weights: Sequence[float], num_slots: int, num_devices: int, refine: bool = True
) -> list[list[int]]:
    """Replicate ``weights`` into ``num_slots`` slots and pack them onto ``num_devices`` devices.

    ``refine=False`` is EPLB's algorithm (greedy replication, greedy packing). Refined: the greedy can give hot
    experts more replicas than there are devices to spread them over (9 replicas on 8 devices forces two onto one
    device, which becomes the hottest), so we also try capping the counts at each multiple of the device count, then
    hill-climb on the counts (one replica moved from an expert on the hottest device to another expert) while that
    lowers the hottest device. EPLB's placement is the starting point, so the result is never worse.
    """
    count = replicate(weights, num_slots)

    def place(c: list[int], final: bool) -> tuple[list[list[int]], float]:
        replicas = [e for e in range(len(weights)) for _ in range(c[e])]
        rep_load = [weights[e] / c[e] for e in replicas]
        pack_of = balanced_packing(rep_load, num_devices, refine=final and refine)
        devices: list[list[int]] = [[] for _ in range(num_devices)]
        for e, p in zip(replicas, pack_of):
            devices[p].append(e)
        return devices, _device_max(devices, weights, c)

    if not refine or num_devices == 1:
        return place(count, True)[0]
    candidates = [count]
    for cap in range(num_devices, max(count), num_devices):
        if cap * len(weights) >= num_slots:
            candidates.append(replicate(weights, num_slots, cap))
    best_c, (best, best_max) = count, place(count, True)
    for c in candidates[1:]:
        devices, hot = place(c, True)
        if hot < best_max:
            best_c, best, best_max = c, devices, hot
    # Nothing to gain once the hottest device is at the bound set by the mean or by the largest single replica.
    bound = max(sum(weights) / num_devices, max(w / c for w, c in zip(weights, best_c)))
    for _ in range(8):
        if best_max <= bound * 1.001:
            break
        hot_dev = max(best, key=lambda dev: sum(weights[e] / best_c[e] for e in dev))
        donors = {e for e in hot_dev if best_c[e] > 1}
        takers = sorted(range(len(weights)), key=lambda e: -weights[e] / best_c[e])[:4]
        improved = False
        for a in donors:
            for b in takers:
                if a == b or best_c[a] < 2:
                    continue
                c = list(best_c)
                c[a] -= 1
                c[b] += 1
                devices, hot = place(c, True)
                if hot < best_max * (1 - 1e-9):
                    best_c, best, best_max, improved = c, devices, hot, True
        if not improved:
            break
        bound = max(sum(weights) / num_devices, max(w / c for w, c in zip(weights, best_c)))
    return best


def _group_home_nodes(weights: Sequence[float], num_groups: int, num_nodes: int, refine: bool = True) -> list[int]:
    """Node of each expert group: groups (contiguous expert ranges) packed onto nodes by their total load."""
    size = len(weights) // num_groups
    group_load = [sum(weights[g * size : (g + 1) * size]) for g in range(num_groups)]
    return balanced_packing(group_load, num_nodes, refine)


def _hierarchical_layer(
    w: list[float], R: int, num_groups: int, num_nodes: int, num_gpus: int, refine: bool = True
) -> list[int]:
    E = len(w)
    size = E // num_groups
    gpus_per_node = num_gpus // num_nodes

    def place(node_of_group: list[int]) -> list[int]:
        phy2log: list[int] = []
        for n in range(num_nodes):
            experts = [e for g in range(num_groups) if node_of_group[g] == n for e in range(g * size, (g + 1) * size)]
            for dev in _replicate_and_pack([w[e] for e in experts], R // num_nodes, gpus_per_node, refine):
                phy2log.extend(experts[i] for i in dev)
        return phy2log

    greedy = place(_group_home_nodes(w, num_groups, num_nodes, refine=False))
    if not refine:
        return greedy
    # A better-balanced group-to-node packing usually, but not always, gives a cooler hottest device: keep the
    # better of the two so the refined policy is never worse than EPLB's greedy on any layer.
    swapped = _group_home_nodes(w, num_groups, num_nodes, refine=True)
    if swapped == _group_home_nodes(w, num_groups, num_nodes, refine=False):
        return greedy
    other = place(swapped)
    return other if _layer_imbalance(w, other, num_gpus) < _layer_imbalance(w, greedy, num_gpus) else greedy


def _global_layer(w: list[float], R: int, num_gpus: int, refine: bool = True) -> list[int]:
    return [e for dev in _replicate_and_pack(w, R, num_gpus, refine) for e in dev]


def _layer_imbalance(w: Sequence[float], phy2log: Sequence[int], num_gpus: int) -> float:
    count: dict[int, int] = {}
    for e in phy2log:
        count[e] = count.get(e, 0) + 1
    per = len(phy2log) // num_gpus
    dev = [sum(w[e] / count[e] for e in phy2log[g * per : (g + 1) * per]) for g in range(num_gpus)]
    mean = sum(dev) / num_gpus
    return max(dev) / mean if mean > 0 else 1.0


def _spill_layer(
    w: list[float], R: int, home: list[int], num_nodes: int, num_gpus: int, slack: float
) -> tuple[list[int], float]:
    """Global replica counts, replicas placed on their home node under a node load cap, the rest spilled.

    Returns (phy2log, fraction of tokens served off their group's home node).
    """
    E = len(w)
    count = replicate(w, R)
    slots = R // num_nodes
    cap = sum(w) / num_nodes * (1 + slack)
    free = [slots] * num_nodes
    load = [0.0] * num_nodes
    # Each expert keeps one slot reserved on its home node until it has a replica somewhere, so that spilling hot
    # replicas can never leave a cold expert with no slot at all.
    reserved = [0] * num_nodes
    for e in range(E):
        reserved[home[e]] += 1
    placed = [False] * E
    node_reps: list[list[int]] = [[] for _ in range(num_nodes)]
    spilled = 0.0
    for e in sorted((e for e in range(E) for _ in range(count[e])), key=lambda e: -w[e] / count[e]):
        r = w[e] / count[e]
        h = home[e]
        own = 0 if placed[e] else 1  # a first replica may use the expert's own reservation
        home_ok = free[h] - reserved[h] + own > 0
        others = [m for m in range(num_nodes) if m != h and free[m] - reserved[m] > 0]
        if home_ok and (load[h] + r <= cap or not others):
            m = h
        elif others:
            m = min(others, key=lambda q: load[q])
        else:
            m = h
        if not placed[e]:
            reserved[h] -= 1
            placed[e] = True
        free[m] -= 1
        load[m] += r
        node_reps[m].append(e)
        if m != h:
            spilled += r
    gpus_per_node = num_gpus // num_nodes
    phy2log = [e for reps in node_reps for dev in _pack_onto_devices(reps, w, count, gpus_per_node) for e in dev]
    total = sum(w)
    return phy2log, (spilled / total if total > 0 else 0.0)


def _traffic_aware_layer(
    w: list[float], R: int, num_groups: int, num_nodes: int, num_gpus: int, max_imbalance: float
) -> list[int]:
    hier = _hierarchical_layer(w, R, num_groups, num_nodes, num_gpus)
    if num_nodes == 1 or _layer_imbalance(w, hier, num_gpus) <= max_imbalance:
        return hier
    size = len(w) // num_groups
    node_of_group = _group_home_nodes(w, num_groups, num_nodes)
    home = [node_of_group[e // size] for e in range(len(w))]
    best, best_imb = hier, _layer_imbalance(w, hier, num_gpus)
    for slack in _SPILL_SLACKS:
        cand, _ = _spill_layer(w, R, home, num_nodes, num_gpus, slack)
        imb = _layer_imbalance(w, cand, num_gpus)
        if imb <= max_imbalance:
            return cand
        if imb < best_imb:
            best, best_imb = cand, imb
    return best


def tables_from_phy2log(phy2log_LR: torch.Tensor, num_logical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log2phy[L, E, X] padded with -1, logcnt[L, E]) from phy2log[L, R]; X = R - E + 1 as in EPLB."""
    L, R = phy2log_LR.shape
    logcnt_LE = torch.zeros(L, num_logical, dtype=torch.int64)
    log2phy_LEX = torch.full((L, num_logical, R - num_logical + 1), -1, dtype=torch.int64)
    rows = phy2log_LR.tolist()
    for layer, row in enumerate(rows):
        for r, e in enumerate(row):
            log2phy_LEX[layer, e, logcnt_LE[layer, e]] = r
            logcnt_LE[layer, e] += 1
    return log2phy_LEX, logcnt_LE


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    policy: str = "hierarchical",
    max_imbalance: float = 1.05,
    refine: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place and replicate experts; EPLB's interface and semantics.

    weight: [L, E] load of each logical expert (token counts, e.g. a moving average).
    Returns phy2log[L, R] (logical expert of each slot), log2phy[L, E, R - E + 1] (slots of each expert, -1 padded),
    logcnt[L, E] (replica count). ``max_imbalance`` is the traffic-aware policy's target max/mean device load.
    ``refine=False`` runs EPLB's plain greedy algorithm (the reference our refinements are measured against).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")
    weight_LE = weight.detach().float().cpu()
    if weight_LE.dim() == 1:
        weight_LE = weight_LE[None]
    L, E = weight_LE.shape
    R = num_replicas
    if R % num_gpus or num_gpus % num_nodes or R < E:
        raise ValueError(f"need R % gpus == 0, gpus % nodes == 0 and R >= E (R={R}, gpus={num_gpus}, E={E})")
    if policy != "global" and (E % num_groups or num_groups % num_nodes or (R // num_nodes) < E // num_nodes):
        raise ValueError(f"need E % groups == 0, groups % nodes == 0 (E={E}, groups={num_groups}, nodes={num_nodes})")
    rows = []
    for w in weight_LE.tolist():
        if policy == "global":
            rows.append(_global_layer(w, R, num_gpus, refine))
        elif policy == "hierarchical":
            rows.append(_hierarchical_layer(w, R, num_groups, num_nodes, num_gpus, refine))
        else:
            rows.append(_traffic_aware_layer(w, R, num_groups, num_nodes, num_gpus, max_imbalance))
    phy2log_LR = torch.tensor(rows, dtype=torch.int64)
    log2phy_LEX, logcnt_LE = tables_from_phy2log(phy2log_LR, E)
    return phy2log_LR, log2phy_LEX, logcnt_LE


def contiguous_placement(num_layers: int, num_experts: int, num_replicas: int) -> torch.Tensor:
    """The unbalanced baseline phy2log[L, R]: slot r holds expert r mod E (no replicas when R == E)."""
    return (torch.arange(num_replicas, dtype=torch.int64) % num_experts).expand(num_layers, -1).clone()


def split_slots(
    text_load: float, vision_load: float, slots_per_gpu: int, num_gpus: int, e_text: int, e_vision: int
) -> tuple[int, int]:
    """Slots per device for (text, vision): proportional to the pools' loads, each pool on every device and able to
    hold one replica of each of its experts."""
    min_t, min_v = max(1, -(-e_text // num_gpus)), max(1, -(-e_vision // num_gpus))
    if min_t + min_v > slots_per_gpu:
        raise ValueError(f"{slots_per_gpu} slots per device cannot hold both pools (need {min_t} + {min_v})")
    total = text_load + vision_load
    t = round(slots_per_gpu * text_load / total) if total > 0 else slots_per_gpu // 2
    t = min(max(t, min_t), slots_per_gpu - min_v)
    return t, slots_per_gpu - t


def rebalance_modalities(
    text_weight: torch.Tensor,
    vision_weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    policy: str = "hierarchical",
    max_imbalance: float = 1.05,
    split: str = "search",
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """ERNIE's modality split: text and vision experts balanced as separate pools, each present on every device.

    ``num_replicas`` is the total over both pools; each device's ``num_replicas // num_gpus`` slots are split
    between the pools: ``split="proportional"`` in proportion to their total load, ``"search"`` (default) tries
    every feasible split and keeps the one with the lowest mean max/mean of the summed device load (a proportional
    split can leave the smaller pool without a single spare slot, so its hottest expert, unreplicated, sets the step
    time). Give the weights in the same unit, e.g. tokens × FLOPs per token, since the pools' experts differ in size.
    Device g's first ``R_text // num_gpus`` slots hold text replicas, the rest vision; each pool's tables use
    pool-local slot numbers (slot r of device g is ``g * (R_pool // num_gpus) + r`` within the pool).
    Returns {"text": tables, "vision": tables}.
    """
    from ernie_platform.balance.metrics import device_loads, max_over_mean

    per_gpu = num_replicas // num_gpus
    E_t, E_v = text_weight.shape[-1], vision_weight.shape[-1]
    t0, _ = split_slots(float(text_weight.sum()), float(vision_weight.sum()), per_gpu, num_gpus, E_t, E_v)
    if split == "proportional":
        splits = [t0]
    else:
        min_t, min_v = max(1, -(-E_t // num_gpus)), max(1, -(-E_v // num_gpus))
        splits = list(range(min_t, per_gpu - min_v + 1))
    best: dict | None = None
    best_score = float("inf")
    for t in splits:
        out = {}
        for name, weight, per in (("text", text_weight, t), ("vision", vision_weight, per_gpu - t)):
            out[name] = rebalance_experts(
                weight, per * num_gpus, num_groups, num_nodes, num_gpus, policy, max_imbalance
            )
        if len(splits) == 1:
            return out
        w_t, w_v = text_weight.reshape(-1, E_t), vision_weight.reshape(-1, E_v)
        dev = device_loads(w_t, out["text"][0], num_gpus) + device_loads(w_v, out["vision"][0], num_gpus)
        score = float(max_over_mean(dev).mean())
        if score < best_score - 1e-9 or (abs(score - best_score) <= 1e-9 and t == t0):
            best, best_score = out, score
    assert best is not None
    return best
