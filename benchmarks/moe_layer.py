"""MoE layer benchmark: our `MoEBlock` (expert backends torch / eager) against transformers' ERNIE 4.5 MoE block.

Run from the repository root:

    python -m benchmarks.moe_layer                 # full run (demo + 21b-like shapes)
    python benchmarks/moe_layer.py --quick         # smoke setting, well under a minute
    python -m benchmarks.moe_layer --shapes 21b-like --tokens 2048 --iters 10

For every shape and token count, our block and transformers' `Ernie4_5_MoeSparseMoeBlock` (one instance per experts
implementation: eager, batched_mm, grouped_mm) are loaded with the same weights and checked to agree (outputs within
1e-4, gradients within 1e-4 relative) before anything is timed. Each step is forward + backward of
loss = (y * g).sum() with a fixed random cotangent g, fp32, train mode; implementations are timed round-robin so that
load from other processes hits them alike, and the median step time is reported. Also reported:

* saved-for-backward MiB: bytes of the distinct storages that autograd keeps for backward (collected with
  `torch.autograd.graph.saved_tensors_hooks`), excluding parameters and the block input, which exist anyway;
* block GFLOP/s: expert-matmul FLOPs (fwd + bwd, `kernels.moe.expert_flops`) divided by the whole block's step time;
* expert GFLOP/s and % dense: the same FLOPs divided by the time of the expert compute alone (fixed routing; ours via
  `kernels.moe_experts`, transformers' via its `experts` module), as a fraction of this machine's dense fp32
  matmul rate measured in the same run ([4096, 1024] x [1024, 1024]).

transformers' batched_mm gathers one [2F, D] and one [D, F] weight matrix per routed (token, k) pair; it is skipped
with "n/a (reason)" when that would exceed --max-gib, and also when the allocation fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # `python benchmarks/moe_layer.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

import ernie_platform.kernels.moe as kmoe
from benchmarks.machine import cpu_model
from ernie_platform.kernels.moe import expert_flops, moe_experts
from ernie_platform.models.config import ErnieModelArgs, MoEConfig
from ernie_platform.models.moe import MoEBlock

PARITY_ATOL = 1e-4  # outputs
GRAD_RTOL = 1e-4  # gradients, relative to the largest reference magnitude
HF_IMPLS = ("eager", "batched_mm", "grouped_mm")
IMPLS = ("ours/torch", "ours/eager", *(f"hf/{i}" for i in HF_IMPLS))
DEFAULT_GEMM_MODE = getattr(kmoe, "cpu_gemm_mode", None)  # how ours/torch runs its CPU grouped GEMMs, if selectable
TARGET_SPEEDUP = 1.3
TARGET_DENSE_FRACTION = 0.70


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    ffn: int
    experts: int
    top_k: int
    shared: int
    tokens: tuple[int, ...]
    note: str = ""


SHAPES = {
    "demo": Shape("demo", hidden=256, ffn=256, experts=16, top_k=2, shared=1, tokens=(4096,),
                  note="the embedded demo model's MoE layer (conf/model/ernie45_demo_moe.yaml)"),
    "21b-like": Shape("21b-like", hidden=1024, ffn=512, experts=64, top_k=6, shared=0, tokens=(1024, 2048, 4096),
                      note="ERNIE-4.5-21B-A3B's routing (64 experts, top-6) at reduced widths; no shared expert"),
}  # fmt: skip
QUICK_TOKENS = 256


@dataclass
class Row:
    shape: str
    tokens: int
    impl: str
    step_s: Optional[float] = None
    saved_mib: Optional[float] = None
    expert_s: Optional[float] = None
    na: str = ""
    dense_gflops: Optional[float] = None  # this machine's dense matmul rate, measured interleaved with these steps
    times: list[float] = field(default_factory=list)
    expert_times: list[float] = field(default_factory=list)


# ---- setup -------------------------------------------------------------------------------------------------------


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_ours(shape: Shape, seed: int) -> MoEBlock:
    args = ErnieModelArgs(
        hidden_size=shape.hidden,
        num_attention_heads=max(1, shape.hidden // 64),
        num_key_value_heads=1,
        moe_num_experts=shape.experts,
        moe_k=shape.top_k,
        moe_intermediate_size=shape.ffn,
        moe_num_shared_experts=shape.shared,
    )
    block = MoEBlock(args, MoEConfig(backend="torch"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        block.gate.weight.normal_(0.0, 0.02, generator=gen)
        block.gate.e_score_correction_bias.normal_(0.0, 1e-3, generator=gen)
        block.w13_E2FD.normal_(0.0, 0.02, generator=gen)
        block.w2_EDF.normal_(0.0, 0.02, generator=gen)
        if block.shared_experts is not None:
            for p in block.shared_experts.parameters():
                p.normal_(0.0, 0.02, generator=gen)
    return block.train()


def build_hf(shape: Shape, ours: MoEBlock, impl: str) -> nn.Module:
    """transformers' block with `experts_implementation=impl` (the config kwarg that sets `_experts_implementation`)."""
    from transformers.models.ernie4_5_moe.configuration_ernie4_5_moe import Ernie4_5_MoeConfig
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeSparseMoeBlock

    config = Ernie4_5_MoeConfig(
        hidden_size=shape.hidden,
        intermediate_size=4 * shape.hidden,
        num_hidden_layers=2,
        num_attention_heads=max(1, shape.hidden // 64),
        num_key_value_heads=1,
        moe_num_experts=shape.experts,
        moe_k=shape.top_k,
        moe_intermediate_size=shape.ffn,
        moe_num_shared_experts=shape.shared,
        use_bias=False,
        experts_implementation=impl,
    )
    block = Ernie4_5_MoeSparseMoeBlock(config)
    if block.experts.config._experts_implementation != impl:
        raise SystemExit(f"transformers block: experts implementation {impl!r} did not take effect")
    ours_sd = ours.state_dict()
    sd = {
        "gate.weight": ours_sd["gate.weight"],
        "gate.moe_statics.e_score_correction_bias": ours_sd["gate.e_score_correction_bias"],
        "experts.gate_up_proj": ours_sd["w13_E2FD"],
        "experts.down_proj": ours_sd["w2_EDF"],
    }
    sd.update({k: v for k, v in ours_sd.items() if k.startswith("shared_experts.")})
    block.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    return block.train()


# ---- one training step ------------------------------------------------------------------------------------------


def step(block: nn.Module, x_BTD: torch.Tensor, g_BTD: torch.Tensor) -> torch.Tensor:
    for p in block.parameters():
        p.grad = None
    x_BTD.grad = None
    y = block(x_BTD)
    (y * g_BTD).sum().backward()
    return y


def grads(block: nn.Module, hf: bool, x_BTD: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients under our parameter names."""
    named = dict(block.named_parameters())
    rename = {"experts.gate_up_proj": "w13_E2FD", "experts.down_proj": "w2_EDF"} if hf else {}
    out = {rename.get(k, k): p.grad for k, p in named.items() if p.grad is not None}
    out["input"] = x_BTD.grad
    return out


def check_parity(ref_y, ref_g, y, g, label: str) -> None:
    diff = (y - ref_y).abs().max().item()
    if not diff <= PARITY_ATOL:
        raise SystemExit(f"PARITY FAILURE {label}: outputs differ by {diff:.3e} (> {PARITY_ATOL}); not timing")
    if set(ref_g) != set(g):
        raise SystemExit(f"PARITY FAILURE {label}: gradients for {sorted(set(ref_g) ^ set(g))} missing on one side")
    for k in ref_g:
        scale = max(ref_g[k].abs().max().item(), 1e-12)
        rel = (g[k] - ref_g[k]).abs().max().item() / scale
        if not rel <= GRAD_RTOL:
            raise SystemExit(f"PARITY FAILURE {label}: grad {k} differs by {rel:.3e} relative (> {GRAD_RTOL})")


def saved_for_backward_mib(fn: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> float:
    """Distinct storages autograd saves for backward during `fn()` (a forward), minus `exclude` (params, input)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    del y
    return sum(seen.values()) / 2**20


def batched_mm_bytes(shape: Shape, tokens: int) -> int:
    """Peak estimate for transformers' batched_mm: gathered per-pair weights, kept for backward, plus their grads."""
    pairs = tokens * shape.top_k
    return 2 * pairs * 3 * shape.ffn * shape.hidden * 4


def eager_grad_bytes(shape: Shape) -> int:
    """Per-step buffer traffic of the per-expert loops: indexing w[e] under autograd gives every expert a zero-filled
    weight-gradient the size of the whole [E, ...] parameter (SelectBackward), so a step costs E of them."""
    return shape.experts * shape.experts * 3 * shape.ffn * shape.hidden * 4


def mem_available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class DenseMatmul:
    """The reference rate: a plain fp32 [4096, 1024] x [1024, 1024] matmul, timed between the benchmark's steps."""

    FLOPS = 2 * 4096 * 1024 * 1024

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(1234)
        self.a = torch.randn(4096, 1024, generator=gen)
        self.b = torch.randn(1024, 1024, generator=gen)
        self.out = torch.empty(4096, 1024)
        for _ in range(3):
            self()

    def __call__(self) -> None:
        torch.mm(self.a, self.b, out=self.out)

    def gflops(self, iters: int) -> float:
        return self.FLOPS / statistics.median(timed(self) for _ in range(iters)) / 1e9


# ---- the benchmark ----------------------------------------------------------------------------------------------


@dataclass
class Impl:
    block: nn.Module
    hf: bool
    experts_fn: Callable[[], None]  # forward + backward of the expert compute alone, fixed routing
    gemm_mode: Optional[str] = None  # ernie_platform.kernels.moe.cpu_gemm_mode to run ours/torch under

    def __enter__(self) -> Impl:
        if self.gemm_mode is not None:
            kmoe.cpu_gemm_mode = self.gemm_mode
        return self

    def __exit__(self, *exc) -> None:
        if self.gemm_mode is not None:
            kmoe.cpu_gemm_mode = DEFAULT_GEMM_MODE


def ours_names(args: argparse.Namespace) -> list[tuple[str, Optional[str]]]:
    """(row name, gemm mode) of the ours/torch rows: one per --cpu-gemm-modes entry, the first is the reference."""
    if not args.cpu_gemm_modes:
        return [("ours/torch", None)]
    return [(f"ours/torch[{m}]", m) for m in args.cpu_gemm_modes]


def bench_shape(shape: Shape, tokens: int, args: argparse.Namespace, dense: DenseMatmul) -> list[Row]:
    seed_all(args.seed)
    ours = build_ours(shape, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(1, tokens, shape.hidden, generator=gen).requires_grad_(True)
    g = torch.randn(1, tokens, shape.hidden, generator=gen)
    x_TD = x.detach().reshape(tokens, shape.hidden)
    with torch.no_grad():
        _, _, idx_TK, w_TK = ours.gate(x_TD)
    g_TD = g.reshape(tokens, shape.hidden)

    def ours_experts(block: MoEBlock, backend: str) -> Callable[[], None]:
        xe = x_TD.clone().requires_grad_(True)
        we = w_TK.clone().requires_grad_(True)

        def run() -> None:
            for t in (xe, we, block.w13_E2FD, block.w2_EDF):
                t.grad = None
            (moe_experts(xe, idx_TK, we, block.w13_E2FD, block.w2_EDF, backend) * g_TD).sum().backward()

        return run

    def hf_experts(block: nn.Module) -> Callable[[], None]:
        xe = x_TD.clone().requires_grad_(True)
        we = w_TK.clone().requires_grad_(True)

        def run() -> None:
            for t in (xe, we, *block.experts.parameters()):
                t.grad = None
            (block.experts(xe, idx_TK, we) * g_TD).sum().backward()

        return run

    def skip_reason(name: str) -> str:
        if name not in args.impls:
            return "skipped (--impls)"
        if args.quick and name.endswith("/eager") and eager_grad_bytes(shape) > 2**30:
            return "skipped (--quick: E full-size weight-grad buffers per step)"
        if name == "hf/batched_mm" and batched_mm_bytes(shape, tokens) > args.max_gib * 2**30:
            need = batched_mm_bytes(shape, tokens) / 2**30
            return f"n/a (needs ~{need:.1f} GiB for per-pair weight copies > --max-gib {args.max_gib:.1f})"
        return ""

    impls: dict[str, Impl] = {}
    rows: dict[str, Row] = {}
    # ours/torch always runs (the first one is the parity reference); all ours/torch rows share one block
    for name, mode in ours_names(args):
        impls[name] = Impl(ours, False, ours_experts(ours, "torch"), mode)
        rows[name] = Row(shape.name, tokens, name)
    ref_name = next(iter(impls))
    for name in IMPLS[1:]:
        rows[name] = Row(shape.name, tokens, name, na=skip_reason(name))
        if rows[name].na:
            continue
        if name == "ours/eager":
            block = build_ours(shape, args.seed)  # a second instance with the same weights, expert backend eager
            block.load_state_dict(ours.state_dict())
            block.backend = "eager"
            impls[name] = Impl(block, False, ours_experts(block, "eager"))
        else:
            block = build_hf(shape, ours, name.split("/", 1)[1])
            impls[name] = Impl(block, True, hf_experts(block))

    # parity: every implementation against the reference, outputs and gradients; the step time sets the iterations
    first_step_s: dict[str, float] = {}
    ref_y = ref_g = None
    for name, impl in list(impls.items()):
        try:
            with impl:
                t0 = time.perf_counter()
                y = step(impl.block, x, g).detach()
                first_step_s[name] = time.perf_counter() - t0
        except (RuntimeError, MemoryError) as e:
            if name == ref_name:
                raise
            rows[name].na = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
            del impls[name]
            continue
        if ref_y is None:
            ref_y, ref_g = y.clone(), {k: v.clone() for k, v in grads(impl.block, False, x).items()}
        else:
            check_parity(
                ref_y, ref_g, y, grads(impl.block, impl.hf, x), f"{shape.name} T={tokens} {name} vs {ref_name}"
            )
    print(f"  parity ok: {', '.join(impls)} agree (outputs <= {PARITY_ATOL}, grads <= {GRAD_RTOL} relative)")

    # saved-for-backward
    for name, impl in impls.items():
        exclude = [*impl.block.parameters(), *impl.block.buffers(), x]
        with impl:
            rows[name].saved_mib = saved_for_backward_mib(lambda b=impl.block: b(x), exclude)

    # warm-up, then timed steps round-robin (whole block, then experts only). Slow implementations get fewer steps:
    # about --budget-s seconds each, at least one.
    n_iters = {n: max(1, min(args.iters, int(args.budget_s / max(t, 1e-9)))) for n, t in first_step_s.items()}
    slow = {n for n, t in first_step_s.items() if t > 1.0}  # the parity step already warmed these up
    for _ in range(args.warmup):
        for name, impl in impls.items():
            if name not in slow:
                with impl:
                    step(impl.block, x, g)
                    impl.experts_fn()
    dense_times: list[float] = []
    for i in range(args.iters):
        dense_times += [timed(dense) for _ in range(3)]
        for name, impl in impls.items():
            if i >= n_iters[name] or rows[name].na:
                continue
            try:
                with impl:
                    rows[name].times.append(timed(lambda b=impl.block: step(b, x, g)))
                    rows[name].expert_times.append(timed(impl.experts_fn))
            except (RuntimeError, MemoryError) as e:  # e.g. batched_mm running out of memory mid-run
                rows[name].na = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    dense_gflops = DenseMatmul.FLOPS / statistics.median(dense_times) / 1e9
    print(f"  {'dense matmul':22s} {dense_gflops:.1f} GFLOP/s (median of {len(dense_times)}, interleaved)")
    for name, row in rows.items():
        row.dense_gflops = dense_gflops
        if row.times and not row.na:
            row.step_s = statistics.median(row.times)
            row.expert_s = statistics.median(row.expert_times)
            print(f"  {name:22s} {len(row.times):2d} steps, median {1e3 * row.step_s:9.1f} ms "
                  f"(experts only {1e3 * row.expert_s:9.1f} ms)")  # fmt: skip

    if args.profile:
        with impls[ref_name]:
            profile_ours(ours, x, g, shape, tokens, ref_name)
    return list(rows.values())


def profile_ours(block: MoEBlock, x: torch.Tensor, g: torch.Tensor, shape: Shape, tokens: int, name: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    step(block, x, g)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step(block, x, g)
    print(f"\n  profile {name}, {shape.name} T={tokens} (3 steps, self CPU time):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))


# ---- report -----------------------------------------------------------------------------------------------------


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def code_revision() -> str:
    """git commit of the checkout, and whether the code under test has uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "ernie_platform/kernels", "ernie_platform/models"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head}{' + uncommitted changes in ernie_platform/kernels/ or ernie_platform/models/' if dirty else ''}"


def fmt_table(rows: list[Row], shapes: dict[str, Shape]) -> tuple[str, dict]:
    header = (
        "| shape | tokens | implementation | tokens/s | speedup vs hf best | saved-for-bwd MiB | block GFLOP/s "
        "| expert GFLOP/s | expert % of dense | dense GFLOP/s |"
    )
    lines = [header, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    summary: dict = {}
    groups: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.shape, r.tokens), []).append(r)
    for (shape_name, tokens), group in groups.items():
        shape = shapes[shape_name]
        flops = expert_flops(tokens * shape.top_k, shape.hidden, shape.ffn, backward=True)
        hf_best = min((r.step_s for r in group if r.impl.startswith("hf/") and r.step_s), default=None)
        hf_best_name = next((r.impl for r in group if r.step_s == hf_best and r.impl.startswith("hf/")), None)
        for r in group:
            if r.step_s is None:
                lines.append(f"| {shape_name} | {tokens} | {r.impl} | {r.na or 'n/a'} | | | | | | |")
                continue
            speedup = hf_best / r.step_s if hf_best else float("nan")
            exp_gf = flops / r.expert_s / 1e9
            lines.append(
                f"| {shape_name} | {tokens} | {r.impl} | {tokens / r.step_s:,.0f} | {speedup:.2f}x | "
                f"{r.saved_mib:.1f} | {flops / r.step_s / 1e9:.1f} | {exp_gf:.1f} | "
                f"{100 * exp_gf / r.dense_gflops:.0f}% | {r.dense_gflops:.0f} |"
            )
        ours = next((r for r in group if r.impl.startswith("ours/torch")), None)  # the reference row comes first
        if ours and ours.step_s:
            summary[f"{shape_name}/{tokens}"] = {
                "speedup_vs_hf_best": hf_best / ours.step_s if hf_best else None,
                "hf_best": hf_best_name,
                "ours": ours.impl,
                "dense_gflops": ours.dense_gflops,
                "expert_fraction_of_dense": flops / ours.expert_s / 1e9 / ours.dense_gflops,
                "rows": {
                    r.impl: {"step_s": r.step_s, "expert_s": r.expert_s, "saved_mib": r.saved_mib, "na": r.na}
                    for r in group
                },
            }
    return "\n".join(lines), summary


def targets(summary: dict) -> list[str]:
    out = []
    for shape in SHAPES:
        keys = [k for k in summary if k.startswith(shape + "/")]
        if not keys:
            continue
        sp = {k: summary[k]["speedup_vs_hf_best"] for k in keys}
        ok = all(v is not None and v >= TARGET_SPEEDUP for v in sp.values())
        detail = ", ".join(f"T={k.split('/')[1]}: {v:.2f}x vs {summary[k]['hf_best']}" for k, v in sp.items() if v)
        verdict = "MET" if ok else "NOT MET"
        out.append(f"{verdict}: {shape} whole block >= {TARGET_SPEEDUP}x transformers' fastest ({detail})")
    keys = [k for k in summary if k.startswith("21b-like/")]
    if keys:
        fr = {k: summary[k]["expert_fraction_of_dense"] for k in keys}
        ok = all(v >= TARGET_DENSE_FRACTION for v in fr.values())
        detail = ", ".join(f"T={k.split('/')[1]}: {100 * v:.0f}%" for k, v in fr.items())
        out.append(
            f"{'MET' if ok else 'NOT MET'}: 21b-like expert math >= {100 * TARGET_DENSE_FRACTION:.0f}% of dense matmul "
            f"({detail})"
        )
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--tokens", type=int, nargs="+", help="token counts for every selected shape (default: per shape)")
    p.add_argument("--iters", type=int, default=10, help="timed steps per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--budget-s",
        type=float,
        default=60.0,
        help="approximate seconds of timed steps per implementation and token count; slow ones get fewer",
    )
    p.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLS,
        default=list(IMPLS),
        help="implementations to time (ours/torch always runs: it is the parity reference)",
    )
    p.add_argument(
        "--cpu-gemm-modes",
        nargs="+",
        choices=getattr(kmoe, "CPU_GEMM_MODES", ()),
        help="time ours/torch once per kernels.moe.cpu_gemm_mode (rows ours/torch[MODE]; the first is the parity\n"
        f"reference and the one the targets use). Default: the library default ({DEFAULT_GEMM_MODE})",
    )
    p.add_argument("--threads", type=int, default=usable_cores(), help="torch threads (default: cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-gib",
        type=float,
        default=None,
        help="skip transformers' batched_mm above this estimated memory (default: 40%% of MemAvailable)",
    )
    p.add_argument("--quick", action="store_true", help=f"smoke setting: {QUICK_TOKENS} tokens, 1 warm-up, 2 steps")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of ours/torch per shape")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.cpu_gemm_modes and DEFAULT_GEMM_MODE is None:
        p.error("--cpu-gemm-modes: this ernie_platform/kernels/moe.py has no cpu_gemm_mode")
    if args.quick:
        args.iters, args.warmup, args.budget_s = 2, 1, 5.0
        args.tokens = args.tokens or [QUICK_TOKENS]
    if args.max_gib is None:
        args.max_gib = 0.4 * mem_available_bytes() / 2**30

    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    seed_all(args.seed)
    import transformers

    print(
        f"machine: {os.cpu_count()} logical CPUs, {cpu_model()}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, MKL {torch.backends.mkl.is_available()}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}); transformers {transformers.__version__}"
    )
    print(f"code: {code_revision()}; ernie_platform.kernels.moe.cpu_gemm_mode default: {DEFAULT_GEMM_MODE}")
    dense = DenseMatmul()
    print(f"dense fp32 matmul [4096,1024]x[1024,1024]: {dense.gflops(5):.1f} GFLOP/s (re-measured per shape)")
    for s in args.shapes:
        sh = SHAPES[s]
        print(f"shape {s}: D={sh.hidden} F={sh.ffn} E={sh.experts} K={sh.top_k} shared={sh.shared} - {sh.note}")

    rows: list[Row] = []
    t_start = time.perf_counter()
    for s in args.shapes:
        for tokens in args.tokens or SHAPES[s].tokens:
            print(f"- {s} T={tokens}")
            rows += bench_shape(SHAPES[s], tokens, args, dense)
    table, summary = fmt_table(rows, SHAPES)
    print()
    print(table)
    print()
    print("targets" + (" (quick setting: not representative)" if args.quick else "") + ":")
    status = targets(summary)
    for line in status:
        print("  " + line)
    maxrss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process max RSS: {maxrss_mib:.0f} MiB (whole run); wall {time.perf_counter() - t_start:.1f} s")
    if args.json:
        meta = {"threads": args.threads, "code": code_revision(), "cpu_gemm_mode_default": DEFAULT_GEMM_MODE}
        args.json.write_text(json.dumps({**meta, "results": summary, "targets": status}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
