"""Renumbering a new placement to keep experts where a previous one had them (fewer parameter moves).

Shapes: L layers, R physical slots.
"""

from __future__ import annotations

import torch


def align_to_previous(
    phy2log_LR: torch.Tensor, prev_phy2log_LR: torch.Tensor, num_gpus: int, num_nodes: int
) -> torch.Tensor:
    """Renumber a placement's devices and slots to move as few experts as possible from ``prev_phy2log_LR``.

    Only devices inside one node are permuted (devices are numbered node-major, so nodes keep their experts) and
    slots inside one device, so every device holds the same experts as before the call: all load and traffic metrics
    are unchanged, only the (layer, slot) entries that differ from the previous placement -- the migration -- shrink.
    """
    L, R = phy2log_LR.shape
    per = R // num_gpus
    out = phy2log_LR.clone()
    if prev_phy2log_LR.shape != phy2log_LR.shape:
        return out
    new_rows, old_rows = phy2log_LR.tolist(), prev_phy2log_LR.tolist()
    for layer in range(L):
        new_devs = [new_rows[layer][g * per : (g + 1) * per] for g in range(num_gpus)]
        old_devs = [old_rows[layer][g * per : (g + 1) * per] for g in range(num_gpus)]
        # Greedy matching of new device contents to old device positions by the experts they share.
        gpn = num_gpus // num_nodes
        pairs = []
        for a, nd in enumerate(new_devs):
            for b in range(a // gpn * gpn, (a // gpn + 1) * gpn):
                pairs.append((-_overlap(nd, old_devs[b]), a, b))
        pairs.sort()
        target = [-1] * num_gpus
        taken = [False] * num_gpus
        for _, a, b in pairs:
            if target[a] < 0 and not taken[b]:
                target[a], taken[b] = b, True
        row = [0] * R
        for a, b in enumerate(target):
            row[b * per : (b + 1) * per] = _align_slots(new_devs[a], old_devs[b])
        out[layer] = torch.tensor(row)
    return out


def _overlap(a: list[int], b: list[int]) -> int:
    rest = list(b)
    n = 0
    for e in a:
        if e in rest:
            rest.remove(e)
            n += 1
    return n


def _align_slots(new: list[int], old: list[int]) -> list[int]:
    """Order ``new``'s experts so that those also in ``old`` stay in their old slot."""
    slot: list[int | None] = [None] * len(new)
    rest = list(new)
    for i, e in enumerate(old):
        if e in rest:
            slot[i] = e
            rest.remove(e)
    it = iter(rest)
    return [e if e is not None else next(it) for e in slot]
