"""Step-time bound set by the hottest device, with and without expert balancing, for a published configuration.

    python -m ernie_platform.balance.simulate --model 300b --nodes 8,16,64,512
    python -m ernie_platform.balance.simulate --model vl424b --loads expert_load/step_0000200.json

Model (docs/balance.md explains it): training is synchronous, so each MoE layer's expert compute takes as long as
its hottest device anywhere in the cluster. The cluster is split into expert-parallel (EP) groups of ``--ep`` GPUs,
each holding every expert of the layer (data parallel across groups). The placement is planned once from the
planned loads (recorded statistics, resampled to the model's expert count, or seeded Zipf), then evaluated on each
group's actual step loads: the planned ones with independent log-normal drift (``--drift``), because a placement is
always computed from past loads. Device time = tokens routed to its slots × expert FLOPs per token (fwd + bwd,
18·hidden·width for a SwiGLU expert) / (peak × MFU). "contiguous" is the unbalanced baseline with the same slots
(slot r holds expert r mod E); "balanced" the placement of ``--policy``. Attention, dense layers and communication are
left out: the table is the expert-compute part of a step and how much the hottest device stretches it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import yaml

from ernie_platform.balance.loads import read_loads_file, resample_profile, zipf_loads
from ernie_platform.balance.metrics import device_loads
from ernie_platform.balance.placement import (
    POLICIES,
    contiguous_placement,
    rebalance_experts,
    rebalance_modalities,
)
from ernie_platform.balance.report import default_groups

MODELS = {"300b": "ernie45_300b_a47b", "vl424b": "ernie45_vl_424b_a47b"}
GPU_PEAK_FLOPS = 989e12  # H100 SXM dense bf16, as in the training loop's MFU


def model_spec(name: str) -> dict:
    """Experts, top-k, MoE layer count and expert widths of a published config (conf/model/*.yaml)."""
    path = Path(__file__).resolve().parents[2] / "conf" / "model" / f"{MODELS.get(name, name)}.yaml"
    cfg = yaml.safe_load(path.read_text())
    start, end = cfg["moe_layer_start_index"], cfg["moe_layer_end_index"]
    layers = len(range(start, end + 1, cfg.get("moe_layer_interval", 1)))
    spec = {
        "name": cfg["name"],
        "layers": layers,
        "hidden": cfg["hidden_size"],
        "k": cfg["moe_k"],
        "pools": {"text": (cfg["moe_num_experts"], cfg["moe_intermediate_size"])},
    }
    if "moe_intermediate_size_vision" in cfg:
        # The VL model has as many vision experts as text experts (docs/vl.md).
        spec["pools"]["vision"] = (cfg["moe_num_experts"], cfg["moe_intermediate_size_vision"])
    return spec


def planned_shares(spec: dict, loads: str | None, s: float, seed: int) -> dict[str, torch.Tensor]:
    """[L, E] load shares per pool (rows sum to 1): recorded statistics resampled, or seeded Zipf."""
    recorded = read_loads_file(loads) if loads else {}
    out = {}
    for i, (pool, (E, _)) in enumerate(spec["pools"].items()):
        src = recorded.get(pool, recorded.get("text"))
        if src is not None:
            out[pool] = resample_profile(src, spec["layers"], E, seed=seed + i)
        else:
            w = zipf_loads(spec["layers"], E, s=s, tokens=1.0, seed=seed + i)
            out[pool] = w / w.sum(-1, keepdim=True)
    return out


def simulate(
    spec: dict,
    shares: dict[str, torch.Tensor],
    nodes: int,
    gpus_per_node: int = 8,
    ep: int = 64,
    redundant: int = 1,
    tokens_per_gpu: int = 16384,
    vision_frac: float = 0.25,
    drift: float = 0.1,
    policy: str = "global",
    mfu: float = 0.5,
    seed: int = 0,
    cache: dict | None = None,
) -> dict:
    """One table row: max/mean device time and the per-step expert-compute bound (s), contiguous vs balanced.

    ``cache`` (a dict) keeps placements between rows that share the EP group shape, so shares must not change."""
    gpus = nodes * gpus_per_node
    ep = min(ep, gpus)
    assert gpus % ep == 0 and ep % gpus_per_node == 0, f"EP size {ep} must divide {gpus} GPUs in whole nodes"
    ep_nodes, num_groups_dp = ep // gpus_per_node, gpus // ep
    frac = {"text": 1 - vision_frac if "vision" in shares else 1.0, "vision": vision_frac}
    # Seconds per routed token on an expert of each pool; the planner balances time, not tokens.
    sec = {p: 18 * spec["hidden"] * width / (GPU_PEAK_FLOPS * mfu) for p, (_, width) in spec["pools"].items()}
    assign = tokens_per_gpu * ep * spec["k"]  # token-expert assignments per EP group, per layer
    planned = {p: shares[p] * frac[p] * assign * sec[p] for p in shares}
    per_gpu = {p: max(1, math.ceil(w.shape[1] / ep)) for p, w in planned.items()}
    slots_per_gpu = sum(per_gpu.values()) + redundant
    key = (ep, ep_nodes, slots_per_gpu, policy)
    if cache is not None and key in cache:
        balanced = cache[key]  # the plan depends on the EP group, not on how many groups the cluster has
    elif len(planned) == 2:
        groups = default_groups(math.gcd(*(w.shape[1] for w in planned.values())), ep_nodes)
        tables = rebalance_modalities(
            planned["text"], planned["vision"], slots_per_gpu * ep, groups, ep_nodes, ep, policy
        )
        balanced = {p: tables[p][0] for p in planned}
    else:
        (p, w), = planned.items()  # fmt: skip
        groups = default_groups(w.shape[1], ep_nodes)
        balanced = {p: rebalance_experts(w, slots_per_gpu * ep, groups, ep_nodes, ep, policy)[0]}
    if cache is not None:
        cache[key] = balanced
    # The contiguous baseline gets the same per-pool slots as the balanced placement.
    slots = {p: balanced[p].shape[1] for p in planned}
    contiguous = {p: contiguous_placement(w.shape[0], w.shape[1], slots[p]) for p, w in planned.items()}
    g = torch.Generator().manual_seed(seed)
    hot = {"contiguous": 0.0, "balanced": 0.0}
    worst = {"contiguous": torch.zeros(spec["layers"]), "balanced": torch.zeros(spec["layers"])}
    mean_L = sum(w.sum(-1) for w in planned.values()) / ep
    for _ in range(num_groups_dp):
        dev = {"contiguous": 0.0, "balanced": 0.0}
        for p, w in planned.items():
            actual = w * torch.exp(drift * torch.randn(w.shape, generator=g))
            actual = actual * (w.sum(-1, keepdim=True) / actual.sum(-1, keepdim=True))
            dev["contiguous"] = dev["contiguous"] + device_loads(actual, contiguous[p], ep)
            dev["balanced"] = dev["balanced"] + device_loads(actual, balanced[p], ep)
        for name in hot:
            worst[name] = torch.maximum(worst[name], dev[name].max(-1).values)
    for name in hot:
        hot[name] = float(worst[name].sum())
    ideal = float(mean_L.sum())
    return {
        "nodes": nodes,
        "gpus": gpus,
        "ep_groups": num_groups_dp,
        "slots_per_gpu": slots_per_gpu,
        "ideal_s": ideal,
        "contiguous_s": hot["contiguous"],
        "balanced_s": hot["balanced"],
        "contiguous_ratio": hot["contiguous"] / ideal,
        "balanced_ratio": hot["balanced"] / ideal,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m ernie_platform.balance.simulate", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="300b", help="300b, vl424b or a conf/model file name")
    p.add_argument("--nodes", default="8,16,32,64,128,256,512", help="comma-separated node counts")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--ep", type=int, default=64, help="expert-parallel group size in GPUs")
    p.add_argument("--redundant", type=int, default=1, help="extra slots per GPU for replicas")
    p.add_argument("--tokens-per-gpu", type=int, default=16384, help="tokens per GPU per optimizer step")
    p.add_argument("--vision-frac", type=float, default=0.25, help="VL: fraction of tokens that are vision tokens")
    p.add_argument("--loads", help="recorded expert-load JSON (else seeded Zipf)")
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--drift", type=float, default=0.1, help="log-normal sigma between planned and actual loads")
    # ERNIE routes without group limits, so nothing ties an expert to a node: global balances best by default.
    p.add_argument("--policy", choices=POLICIES, default="global")
    p.add_argument("--mfu", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    spec = model_spec(args.model)
    shares = planned_shares(spec, args.loads, args.zipf_s, args.seed)
    pools = ", ".join(f"{n} {e} experts × {w}" for n, (e, w) in spec["pools"].items())
    print(
        f"{spec['name']}: {spec['layers']} MoE layers, top-{spec['k']}, {pools}; EP {args.ep} GPUs, "
        f"+{args.redundant} slot/GPU, {args.tokens_per_gpu} tokens/GPU/step, policy {args.policy}, "
        f"loads {'from ' + args.loads if args.loads else f'Zipf s={args.zipf_s}'}, drift {args.drift}"
    )
    head = (
        "nodes",
        "GPUs",
        "EP grps",
        "slots/GPU",
        "ideal s",
        "contig s",
        "balanced s",
        "contig x",
        "bal x",
        "speedup",
    )
    print(" ".join(f"{h:>10}" for h in head))
    rows: list[dict] = []
    cache: dict = {}
    for nodes in (int(n) for n in args.nodes.split(",")):
        r = simulate(
            spec, shares, nodes, args.gpus_per_node, args.ep, args.redundant, args.tokens_per_gpu,
            args.vision_frac, args.drift, args.policy, args.mfu, args.seed, cache,
        )  # fmt: skip
        rows.append(r)
        vals = (
            f"{r['nodes']}", f"{r['gpus']}", f"{r['ep_groups']}", f"{r['slots_per_gpu']}", f"{r['ideal_s']:.3f}",
            f"{r['contiguous_s']:.3f}", f"{r['balanced_s']:.3f}", f"{r['contiguous_ratio']:.3f}",
            f"{r['balanced_ratio']:.3f}", f"{r['contiguous_s'] / r['balanced_s']:.2f}",
        )  # fmt: skip
        print(" ".join(f"{v:>10}" for v in vals))
    return rows


if __name__ == "__main__":
    main()
