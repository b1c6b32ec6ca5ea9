"""MoE layer benchmark on a GPU: our `MoEBlock` (backends torch / megablocks) against transformers' ERNIE 4.5 block.

    python -m benchmarks.moe_layer_gpu                      # CUDA, bf16, 21b-like and 21b shapes
    python -m benchmarks.moe_layer_gpu --device cpu --dtype float32 --quick   # smoke run without a GPU

The CPU benchmark (`benchmarks/moe_layer.py`) holds the CPU targets; this one answers the GPU questions: do the
`torch` backend (`F.grouped_mm` on sm90+ bf16) and the `megablocks` backend (`grouped_gemm.ops.gmm`) agree with the
fp32 eager reference, and how fast are they against transformers' `eager`, `batched_mm` and `grouped_mm` experts
implementations loaded with the same weights. Per shape and token count, every implementation is first checked on
the expert computation with fixed routing (outputs and input/weight gradients within 2e-2 relative of the fp32
`eager` reference), then timed with CUDA events (forward + backward of (y * g).sum(), median of --iters after
--warmup). Reported: whole-block tokens/s and speedup against transformers' fastest, the expert compute alone in
TFLOP/s and as a fraction of one dense bf16 matmul of the same FLOPs ([T·K, D] x [D, 2F] then [T·K, F] x [F, D], fwd
and bwd), and the peak memory a step allocates above the weights and inputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.moe_layer import HF_IMPLS, Shape, build_hf, build_ours, seed_all, step
from ernie_platform.kernels.moe import expert_flops, moe_experts

SHAPES = {
    "21b-like": Shape("21b-like", hidden=1024, ffn=512, experts=64, top_k=6, shared=0, tokens=(4096, 16384)),
    "21b": Shape("21b", hidden=2560, ffn=1536, experts=64, top_k=6, shared=0, tokens=(4096, 16384),
                 note="ERNIE-4.5-21B-A3B's MoE layer (shared experts left out: they are a dense MLP)"),
}  # fmt: skip
RTOL = 2e-2  # bf16 against the fp32 reference, relative to the reference's largest magnitude
OURS = ("ours/torch", "ours/megablocks")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach(), ref.detach()
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def cuda_time(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for fn(), measured with CUDA events on GPU (wall clock on CPU)."""
    if device.type != "cuda":
        import time

        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def peak_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench(shape: Shape, tokens: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    seed_all(args.seed)
    ref32 = build_ours(shape, args.seed).to(device)  # fp32 reference weights (eager backend below)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x32 = torch.randn(1, tokens, shape.hidden, generator=gen).to(device)
    g32 = torch.randn(1, tokens, shape.hidden, generator=gen).to(device)
    with torch.no_grad():
        _, _, idx_TK, w_TK = ref32.gate(x32.reshape(tokens, shape.hidden))
    x_TD, g_TD = x32.reshape(tokens, shape.hidden), g32.reshape(tokens, shape.hidden)

    def experts_run(fn: Callable, params: list[torch.Tensor], cast: torch.dtype):
        xe = x_TD.to(cast).clone().requires_grad_(True)
        we = w_TK.to(cast).clone().requires_grad_(True)

        def run():
            for t in (xe, we, *params):
                t.grad = None
            y = fn(xe, we)
            (y * g_TD.to(cast)).sum().backward()
            return y, [xe.grad, we.grad, *(p.grad for p in params)]

        return run

    ref_y, ref_grads = experts_run(
        lambda xe, we: moe_experts(xe, idx_TK, we, ref32.w13_E2FD, ref32.w2_EDF, "eager"),
        [ref32.w13_E2FD, ref32.w2_EDF],
        torch.float32,
    )()
    ref_y, ref_grads = ref_y.detach(), [t.clone() for t in ref_grads]

    rows, impls = [], {}
    for name in args.impls:
        row = {"shape": shape.name, "tokens": tokens, "impl": name, "na": ""}
        rows.append(row)
        try:
            if name in OURS:
                backend = name.split("/")[1]
                if backend == "megablocks" and importlib.util.find_spec("grouped_gemm") is None:
                    row["na"] = "n/a (grouped_gemm not installed)"
                    continue
                block = build_ours(shape, args.seed).to(device=device, dtype=dtype)
                block.gate.float()  # the router stays fp32, as in the model
                block.backend = backend
                params = [block.w13_E2FD, block.w2_EDF]
                fn = experts_run(
                    lambda xe, we, b=block: moe_experts(xe, idx_TK, we, b.w13_E2FD, b.w2_EDF, b.backend), params, dtype
                )
            else:
                block = build_hf(shape, ref32, name.split("/")[1]).to(device=device, dtype=dtype)
                params = list(block.experts.parameters())
                fn = experts_run(lambda xe, we, b=block: b.experts(xe, idx_TK, we), params, dtype)
            y, grads = fn()
            errs = [rel_err(y, ref_y)] + [rel_err(a, b) for a, b in zip(grads, ref_grads)]
            row["max_rel_err"] = max(errs)
            if max(errs) > RTOL and name in OURS:  # transformers' own precision is reported, not judged
                row["na"] = f"PARITY FAILURE: max rel err {max(errs):.2e} > {RTOL}"
                continue
            impls[name] = (block, fn)
        except (RuntimeError, torch.cuda.OutOfMemoryError, MemoryError) as e:
            row["na"] = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:90]})"
            if device.type == "cuda":
                torch.cuda.empty_cache()

    x, g = x32.to(dtype).requires_grad_(True), g32.to(dtype)
    n_pairs = tokens * shape.top_k
    a1 = torch.randn(n_pairs, shape.hidden, device=device, dtype=dtype)
    b1 = torch.randn(shape.hidden, 2 * shape.ffn, device=device, dtype=dtype)
    a2 = torch.randn(n_pairs, shape.ffn, device=device, dtype=dtype)
    b2 = torch.randn(shape.ffn, shape.hidden, device=device, dtype=dtype)

    def dense() -> None:  # the same FLOPs as the experts' fwd + bwd, as plain matmuls
        for a, b in ((a1, b1), (a2, b2)):
            out = a @ b
            out @ b.T
            a.T @ out

    for _ in range(args.warmup):
        dense()
        for name, (block, fn) in list(impls.items()):
            try:
                step(block, x, g)
                fn()
            except (RuntimeError, torch.cuda.OutOfMemoryError, MemoryError) as e:  # e.g. batched_mm's weight copies
                row = next(r for r in rows if r["impl"] == name)
                row["na"] = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:90]})"
                del impls[name]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    dense_s = statistics.median(cuda_time(dense, device) for _ in range(args.iters))
    flops = expert_flops(n_pairs, shape.hidden, shape.ffn, backward=True)
    for row in rows:
        if row["impl"] not in impls:
            continue
        block, fn = impls[row["impl"]]
        block_step = lambda b=block: step(b, x, g)  # noqa: E731
        row["step_s"] = statistics.median(cuda_time(block_step, device) for _ in range(args.iters))
        row["expert_s"] = statistics.median(cuda_time(fn, device) for _ in range(args.iters))
        row["peak_mib"] = peak_mib(block_step, device)
        row["expert_tflops"] = flops / row["expert_s"] / 1e12
        row["dense_fraction"] = dense_s / row["expert_s"]
    del impls
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | tokens | implementation | tokens/s | speedup vs hf best | expert TFLOP/s | expert % of dense "
        "| peak MiB | max rel err |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key in dict.fromkeys((r["shape"], r["tokens"]) for r in rows):
        group = [r for r in rows if (r["shape"], r["tokens"]) == key]
        hf = [r["step_s"] for r in group if r["impl"].startswith("hf/") and "step_s" in r]
        best = min(hf) if hf else None
        for r in group:
            if "step_s" not in r:
                lines.append(f"| {key[0]} | {key[1]} | {r['impl']} | {r['na']} | | | | | |")
                continue
            sp = f"{best / r['step_s']:.2f}x" if best else "n/a"
            mem = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
            lines.append(
                f"| {key[0]} | {key[1]} | {r['impl']} | {key[1] / r['step_s']:,.0f} | {sp} | "
                f"{r['expert_tflops']:.1f} | {100 * r['dense_fraction']:.0f}% | {mem} | {r['max_rel_err']:.1e} |"
            )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--tokens", type=int, nargs="+")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--impls", nargs="+", default=[*OURS, *(f"hf/{i}" for i in HF_IMPLS)])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="256 tokens, 2 iterations: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.iters, args.warmup = args.tokens or [256], 2, 1
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device (use --device cpu --dtype float32 for a smoke run)")
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"device {device} ({gpu}); torch {torch.__version__}; transformers {transformers.__version__}; {dtype}")
    rows = []
    for s in args.shapes:
        for tokens in args.tokens or SHAPES[s].tokens:
            rows += bench(SHAPES[s], tokens, args, device, dtype)
            print(f"- {s} T={tokens} done", flush=True)
    print(table(rows))
    bad = [r for r in rows if r["na"].startswith("PARITY")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
