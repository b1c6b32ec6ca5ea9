"""Quality report of an expert placement for recorded loads.

    python -m ernie_platform.balance.report --file expert_load/step_0000200.json --nodes 2 --gpus-per-node 4
    python -m ernie_platform.balance.report --tracking-uri sqlite:///mlruns.db --run-name pretrain-text --nodes 1

Loads come from a JSON file (``{"loads": {"layer0": [...]}}``, ``text/layerN`` / ``vision/layerN`` for the VL model:
the pretraining job's ``expert_load/step_XXXXXXX.json`` artifacts) or from the newest such artifact of an MLflow run.
Prints, per pool (text, vision) and layer, max/mean device load of the contiguous placement and of the balanced one,
node max/mean, cross-node traffic, traffic off the expert group's node, and slots migrated from the previous placement
(``--previous``, a JSON written by ``--save``; the contiguous placement when not given).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from ernie_platform.balance.align import align_to_previous
from ernie_platform.balance.loads import read_loads_file, read_loads_mlflow
from ernie_platform.balance.metrics import summarize
from ernie_platform.balance.placement import (
    POLICIES,
    contiguous_placement,
    rebalance_experts,
    rebalance_modalities,
)


def default_groups(num_experts: int, num_nodes: int) -> int:
    """Expert groups for the hierarchy: 8 (EPLB's examples) or the node count, whichever divides the experts."""
    for g in (8, num_nodes, 1):
        if g >= num_nodes and g % num_nodes == 0 and num_experts % g == 0:
            return g
    return 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ernie_platform.balance.report", description=__doc__.split("\n")[0])
    src = p.add_argument_group("loads")
    src.add_argument("--file", help="JSON loads file")
    src.add_argument("--tracking-uri", help="MLflow tracking URI, e.g. sqlite:///mlruns.db")
    src.add_argument("--run-id")
    src.add_argument("--run-name", help="latest run of this name")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument(
        "--slots",
        type=int,
        default=None,
        help="physical slots per layer (all pools); default: "
        "one redundant slot per device above the fewest that hold every expert",
    )
    p.add_argument("--groups", type=int, default=None, help="expert groups (default: 8 or the node count)")
    p.add_argument("--policy", choices=POLICIES, default="hierarchical")
    p.add_argument("--max-imbalance", type=float, default=1.05, help="traffic_aware target max/mean")
    p.add_argument("--previous", help="previous placement JSON (from --save) for the migration cost")
    p.add_argument("--save", help="write the placement (phy2log per pool) to this JSON")
    p.add_argument("--expert-bytes", type=int, default=0, help="bytes moved per migrated slot (params + optimizer)")
    p.add_argument("--quiet", action="store_true", help="only the summary lines")
    args = p.parse_args(argv)
    if not args.file and not args.tracking_uri:
        p.error("give --file or --tracking-uri with --run-id / --run-name")
    return args


def _place(pools: dict[str, torch.Tensor], args: argparse.Namespace, gpus: int) -> dict[str, torch.Tensor]:
    sizes = {k: v.shape[1] for k, v in pools.items()}
    min_per_gpu = sum(max(1, math.ceil(e / gpus)) for e in sizes.values())
    slots = args.slots or gpus * (min_per_gpu + 1)
    if len(pools) == 2 and {"text", "vision"} == set(pools):
        groups = args.groups or default_groups(math.gcd(sizes["text"], sizes["vision"]), args.nodes)
        tables = rebalance_modalities(
            pools["text"], pools["vision"], slots, groups, args.nodes, gpus, args.policy, args.max_imbalance
        )
        return {k: v[0] for k, v in tables.items()}
    out = {}
    for name, w in pools.items():
        groups = args.groups or default_groups(w.shape[1], args.nodes)
        pol = args.policy if groups % args.nodes == 0 else "global"
        out[name] = rebalance_experts(w, slots, groups, args.nodes, gpus, pol, args.max_imbalance)[0]
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.file:
        pools = read_loads_file(args.file)
    else:
        pools = read_loads_mlflow(args.tracking_uri, args.run_id, args.run_name)
    gpus = args.nodes * args.gpus_per_node
    placed = _place(pools, args, gpus)
    previous = None
    if args.previous:
        previous = {k: torch.tensor(v) for k, v in json.loads(Path(args.previous).read_text())["phy2log"].items()}
    result: dict = {}
    for name, w in pools.items():
        L, E = w.shape
        phy2log = placed[name]
        R = phy2log.shape[1]
        groups = args.groups or default_groups(E, args.nodes)
        prev = previous[name] if previous and name in previous else contiguous_placement(L, E, R)
        # Same devices' contents, renumbered to keep experts where they already are: fewer parameter moves.
        phy2log = placed[name] = align_to_previous(phy2log, prev, gpus, args.nodes)
        base = summarize(w, contiguous_placement(L, E, R), groups, args.nodes, gpus)
        s = summarize(w, phy2log, groups, args.nodes, gpus, prev, args.expert_bytes)
        result[name] = {"contiguous": base, "balanced": s}
        print(
            f"[{name}] {L} layers × {E} experts, {R} slots on {args.nodes} node(s) × {args.gpus_per_node} devices, "
            f"{groups} groups, policy {args.policy}"
        )
        if not args.quiet:
            head = ("layer", "dev contig", "dev bal", "node bal", "x-node", "off-grp", "moved")
            print(" ".join(f"{h:>{w}}" for h, w in zip(head, (5, 10, 8, 8, 7, 7, 6))))
            for i in range(L):
                print(
                    f"{i:>5} {float(base['device_max_mean_L'][i]):>10.3f} {float(s['device_max_mean_L'][i]):>8.3f} "
                    f"{float(s['node_max_mean_L'][i]):>8.3f} {float(s['cross_node_L'][i]):>7.3f} "
                    f"{float(s['off_group_node_L'][i]):>7.3f} {int(s['migration_L'][i]):>6d}"
                )
        print(
            f"[{name}] mean device max/mean {base['device_max_mean']:.3f} contiguous -> {s['device_max_mean']:.3f} "
            f"balanced; node max/mean {s['node_max_mean']:.3f}; cross-node traffic {s['cross_node']:.3f} "
            f"(contiguous {base['cross_node']:.3f}); off-group-node {s['off_group_node']:.3f}; migration "
            f"{s['migration_slots']} slots, {s['migration_bytes'] / 2**30:.2f} GiB"
        )
    if args.save:
        Path(args.save).write_text(
            json.dumps({"policy": args.policy, "phy2log": {k: v.tolist() for k, v in placed.items()}})
        )
    return result


if __name__ == "__main__":
    main()
