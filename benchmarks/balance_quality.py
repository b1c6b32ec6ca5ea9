"""Placement quality on seeded Zipf loads vs DeepSeek EPLB's published figures (results in docs/balance.md).

    python benchmarks/balance_quality.py [--layers 58] [--seeds 0,1,2] [--noise 0.0]

For each case: mean over layers (and seeds) of max/mean device load for the contiguous placement without replicas,
EPLB's plain greedy algorithm (our reimplementation, ``refine=False``), and ours; node max/mean, cross-node traffic
and the traffic off the expert group's node; and the wall time of ours.
"""

from __future__ import annotations

import argparse
import time

from ernie_platform.balance import contiguous_placement, rebalance_experts, summarize, zipf_loads

# (label, E, groups, nodes, gpus, slots, policy, EPLB figure or target)
CASES = [
    ("64e 8g 2x4 80 slots", 64, 8, 2, 8, 80, "hierarchical", 1.067),
    ("64e 8g 1x8 80 slots", 64, 8, 1, 8, 80, "global", 1.002),
    ("256e 8g 4x8 288 slots", 256, 8, 4, 32, 288, "hierarchical", 1.51),
    ("256e 8g 4x8 288 slots", 256, 8, 4, 32, 288, "traffic_aware", 1.10),
    ("256e 8g 4x8 288 slots", 256, 8, 4, 32, 288, "global", None),
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=58)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--noise", type=float, default=0.0)
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    head = ("case", "policy", "EPLB fig", "contig", "greedy", "ours", "node", "x-node", "off-grp", "time s")
    print(f"{head[0]:<22} {head[1]:<14}" + "".join(f"{h:>9}" for h in head[2:]))
    for label, E, groups, nodes, gpus, R, policy, ref in CASES:
        acc = {"contig": 0.0, "greedy": 0.0, "ours": 0.0, "node": 0.0, "x": 0.0, "off": 0.0, "t": 0.0}
        for seed in seeds:
            w = zipf_loads(args.layers, E, s=1.1, seed=seed, noise=args.noise)
            t0 = time.perf_counter()
            ours = summarize(w, rebalance_experts(w, R, groups, nodes, gpus, policy)[0], groups, nodes, gpus)
            acc["t"] += time.perf_counter() - t0
            greedy_policy = "global" if policy == "global" else "hierarchical"
            greedy = rebalance_experts(w, R, groups, nodes, gpus, greedy_policy, refine=False)[0]
            acc["greedy"] += summarize(w, greedy, groups, nodes, gpus)["device_max_mean"]
            acc["contig"] += summarize(w, contiguous_placement(args.layers, E, E), groups, nodes, gpus)[
                "device_max_mean"
            ]
            acc["ours"] += ours["device_max_mean"]
            acc["node"] += ours["node_max_mean"]
            acc["x"] += ours["cross_node"]
            acc["off"] += ours["off_group_node"]
        n = len(seeds)
        vals = [f"{ref:.3f}" if ref else "-"] + [
            f"{acc[k] / n:.3f}" for k in ("contig", "greedy", "ours", "node", "x", "off", "t")
        ]
        print(f"{label:<22} {policy:<14}" + "".join(f"{v:>9}" for v in vals))


if __name__ == "__main__":
    main()
