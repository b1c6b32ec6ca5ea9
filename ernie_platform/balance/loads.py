"""Expert loads: the seeded Zipf generator, and reading recorded loads (a JSON file or a pretraining MLflow run)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch


def zipf_loads(
    num_layers: int,
    num_experts: int,
    s: float = 1.1,
    tokens: float = 1e6,
    seed: int = 0,
    noise: float = 0.0,
) -> torch.Tensor:
    """[L, E] seeded Zipf-like loads.

    Per layer: a random permutation assigns ranks 1..E to the experts, expert of rank k gets ``tokens * k^-s / H``
    (H = sum_k k^-s, so a layer sums to ``tokens``), times ``exp(noise * N(0, 1))`` multiplicative noise when noise > 0.
    """
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    shares = ranks.pow(-s)
    shares = shares / shares.sum()
    out = torch.empty(num_layers, num_experts, dtype=torch.float64)
    for layer in range(num_layers):
        perm = torch.randperm(num_experts, generator=g)
        out[layer, perm] = shares * tokens
        if noise > 0:
            out[layer] *= torch.exp(noise * torch.randn(num_experts, generator=g, dtype=torch.float64))
    return out.float()


def _layer_index(name: str) -> int:
    m = re.search(r"layer(\d+)$", name)
    return int(m.group(1)) if m else 0


def loads_from_dict(obj: dict) -> dict[str, torch.Tensor]:
    """Pools of [L, E] loads from ``{"loads": {name: [...]}}`` (or the bare mapping).

    Names like ``layer0`` form the pool "text"; ``text/layer0``, ``vision/layer0`` (the VL model) the pools "text" and
    "vision". Layers are ordered by their index.
    """
    loads = obj.get("loads", obj)
    pools: dict[str, list[tuple[int, list[float]]]] = {}
    for name, values in loads.items():
        pool = name.split("/", 1)[0] if "/" in name else "text"
        pools.setdefault(pool, []).append((_layer_index(name), [float(v) for v in values]))
    return {p: torch.tensor([v for _, v in sorted(rows)], dtype=torch.float32) for p, rows in pools.items()}


def read_loads_file(path: str | Path) -> dict[str, torch.Tensor]:
    return loads_from_dict(json.loads(Path(path).read_text()))


def read_loads_mlflow(tracking_uri: str, run_id: str | None = None, run_name: str | None = None) -> dict:
    """The newest ``expert_load/step_XXXXXXX.json`` artifact of a pretraining run (by id, or the latest run of that
    name) as pools of [L, E] loads."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if run_id is None:
        if run_name is None:
            raise ValueError("give run_id or run_name")
        exps = client.search_experiments()
        runs = client.search_runs(
            [e.experiment_id for e in exps],
            filter_string=f"attributes.run_name = '{run_name}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not runs:
            raise ValueError(f"no run named {run_name!r} at {tracking_uri}")
        run_id = runs[0].info.run_id
    files = [f.path for f in client.list_artifacts(run_id, "expert_load") if f.path.endswith(".json")]
    if not files:
        raise ValueError(f"run {run_id} has no expert_load/*.json artifact")
    newest = max(files)  # step_XXXXXXX is zero-padded, so the name order is the step order
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        local = client.download_artifacts(run_id, newest, d)
        return read_loads_file(local)


def resample_profile(recorded_LE: torch.Tensor, num_layers: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """[L, E] loads with the recorded layers' skew: for each layer, a random recorded layer's sorted load shares are
    interpolated to ``num_experts`` ranks (so a small model's statistics can stand in for a larger one's) and given
    to the experts in a random order. Rows sum to 1."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(num_layers, num_experts)
    for layer in range(num_layers):
        row = recorded_LE[int(torch.randint(recorded_LE.shape[0], (1,), generator=g))].float()
        shares = (row / row.sum().clamp_min(1e-30)).sort(descending=True).values
        # Cumulative share curve, interpolated at num_experts evenly spaced rank quantiles.
        cum = torch.cat([torch.zeros(1), shares.cumsum(0)])
        x_src = torch.linspace(0, 1, cum.numel())
        x_dst = torch.linspace(0, 1, num_experts + 1)
        idx = torch.searchsorted(x_src, x_dst).clamp(1, cum.numel() - 1)
        x0, x1 = x_src[idx - 1], x_src[idx]
        t = ((x_dst - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0, 1)
        cum_dst = cum[idx - 1] + t * (cum[idx] - cum[idx - 1])
        new = (cum_dst[1:] - cum_dst[:-1]).clamp_min(0)
        new = new / new.sum().clamp_min(1e-30)
        out[layer, torch.randperm(num_experts, generator=g)] = new
    return out
