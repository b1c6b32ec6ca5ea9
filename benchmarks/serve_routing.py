"""Request routing benchmark: the pd app with 2 Decode replicas under a skewed workload, `serve.router=load` (our
load-aware router, docs/balance.md "Request routing") against `serve.router=pow2` (Ray Serve's default power of
two choices on ongoing requests), one after the other on one local Ray instance.

Run from the repository root:

    python benchmarks/serve_routing.py                    # 96 requests, 12 clients, both routers, 3 runs
    python benchmarks/serve_routing.py --requests 48 --routers load --runs 1

Workload (the same list, in the same order, for each router): every 4th request is heavy (`n=4` choices and
`--heavy-tokens` output tokens each), the others light (`n=1`, `--light-tokens`); every prompt has
`--prompt-tokens` tokens (>= serve.disagg_min_prompt_tokens, so prefill runs on the Prefill replica); greedy,
`ignore_eos`, streamed, from `--concurrency` closed-loop clients. Ray's default router counts a heavy request like
a light one (one ongoing request); ours counts its sequences and KV reservation.

Measured per router: every `--sample-s` the driver reads each Decode replica's load report (the replica actor's
`record_routing_stats`, which Serve's controller also polls) and keeps its sequence load (running + waiting
sequences); `seq max/mean` is the mean over samples (with any load) of max over replicas / mean over replicas (1.0 =
even); `seq-s share` is each replica's share of the summed sequence load over time. Per replica at the end, from
`Engine.stats()`: requests and generated tokens. Plus wall time, output tok/s and TTFT p50 / p99.
`--runs R` (default 3) repeats both routers R times, the order alternating (load first, then pow2 first, ...), and
ends with medians over the runs with their ranges. `--checkpoint` serves a trained text checkpoint (byte-level
tokenizer) instead of the demo MoE's random weights; results: docs/benchmarks.md ("Request routing").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/serve_routing.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_model  # noqa: E402
from benchmarks.serve_load import local_serve, med_range, pct, stream_completion  # noqa: E402


def workload(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for i in range(args.requests):
        heavy = i % 4 == 0
        base = f"Request {i}: the quick brown fox jumps over the lazy dog. "
        prompt = (base * (args.prompt_tokens // len(base) + 1))[: args.prompt_tokens]
        out.append({"prompt": prompt, "n": 4 if heavy else 1,
                    "max_tokens": args.heavy_tokens if heavy else args.light_tokens})  # fmt: skip
    return out


async def one(session: Any, url: str, model: str, req: dict[str, Any]) -> tuple[float, float, int]:
    """(TTFT s, end time, tokens) of one streamed /v1/completions call."""
    body = {"model": model, "temperature": 0, "stream": True, "ignore_eos": True, "return_token_ids": True, **req}
    t0, arrivals = await stream_completion(session, url, body)
    first = arrivals[0][0] - t0 if arrivals else float("nan")
    return first, time.perf_counter(), sum(k for _, k in arrivals)


async def drive(url: str, model: str, reqs: list[dict[str, Any]], conc: int) -> tuple[float, list[tuple]]:
    import aiohttp

    queue = list(reversed(reqs))
    results: list[tuple] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:  # fmt: skip

        async def worker() -> None:
            while queue:
                results.append(await one(session, url, model, queue.pop()))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        return time.perf_counter() - t0, results


def decode_actors(app: str) -> list[Any]:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and f"{app}#Decode#" in a["name"]]  # fmt: skip
    return [ray.get_actor(n, namespace="serve") for n in sorted(names)]


def engine_stats(app: str, replicas: int) -> dict[str, dict[str, Any]]:
    """Engine.stats() of each Decode replica (through the handle: repeated until every replica answered)."""
    from ray import serve

    h = serve.get_deployment_handle("Decode", app_name=app)
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(50):
        s = h.stats.remote().result(timeout_s=30)
        seen[s["replica"]] = s
        if len(seen) == replicas:
            break
    return seen


def run_router(router: str, ckpt: str, port: int, reqs: list[dict[str, Any]], args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from ernie_platform.serving.app import model_name_for
    from workloads.serve.app import build_app

    app = f"r_{router}"
    cfg = {"model.path": ckpt, "serve.router": router, "serve.decode.num_replicas": 2,
           "serve.engine.max_seq_len": args.prompt_tokens + max(args.heavy_tokens, args.light_tokens),
           "serve.engine.max_batch_size": args.max_batch_size,
           "serve.routing_stats_period_s": args.stats_period_s}  # fmt: skip
    t0 = time.perf_counter()
    serve.run(build_app(cfg), name=app, route_prefix=f"/{app}")
    url = f"http://127.0.0.1:{port}/{app}/v1"
    print(f"[{router}] app up in {time.perf_counter() - t0:.1f} s", flush=True)
    warm = [dict(r, max_tokens=2) for r in reqs[:4]]
    name = model_name_for(ckpt)
    asyncio.run(drive(url, name, warm, 4))
    before = engine_stats(app, 2)
    actors = decode_actors(app)
    assert len(actors) == 2, actors
    samples: list[list[float]] = []
    stop = threading.Event()

    def sampler() -> None:
        while not stop.wait(args.sample_s):
            try:
                rs = ray.get([a.record_routing_stats.remote() for a in actors], timeout=5)
            except Exception:
                continue
            samples.append([r["running_seqs"] + r["waiting_seqs"] for r in rs])

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    wall, results = asyncio.run(drive(url, name, reqs, args.concurrency))
    stop.set()
    th.join()
    after = engine_stats(app, 2)
    serve.delete(app)
    busy = [s for s in samples if sum(s) > 0]
    ratio = sum(max(s) / (sum(s) / len(s)) for s in busy) / max(1, len(busy))
    totals = [sum(s[i] for s in samples) for i in range(2)]
    per = []
    for rid in sorted(after):
        a, b = after[rid], before.get(rid, {})
        per.append({"requests": int(a["requests_finished"] - b.get("requests_finished", 0)),
                    "tokens": int(a["tokens_generated"] - b.get("tokens_generated", 0))})  # fmt: skip
    return {"router": router, "wall_s": wall, "tokens": sum(r[2] for r in results),
            "ttft": [r[0] * 1000 for r in results], "seq_ratio": ratio, "samples": len(busy),
            "share": [t / max(1e-9, sum(totals)) for t in totals], "per": per}  # fmt: skip


def table(rows: list[dict]) -> str:
    out = ["| run | router | seq max/mean (time avg) | seq-s share per replica | requests per replica | output tokens "
           "per replica | tokens max/mean | wall s | output tok/s | TTFT p50 ms | TTFT p99 ms |",
           "|---:|---|---:|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        toks = [p["tokens"] for p in r["per"]]
        tmm = max(toks) / (sum(toks) / len(toks)) if sum(toks) else float("nan")
        share = " / ".join(f"{s:.2f}" for s in r["share"])
        nreq = " / ".join(str(p["requests"]) for p in r["per"])
        out.append(f"| {r.get('run', 1)} | {r['router']} | {r['seq_ratio']:.2f} ({r['samples']} samples) | {share} | "
                   f"{nreq} | "
                   f"{' / '.join(str(t) for t in toks)} | {tmm:.2f} | {r['wall_s']:.1f} | "
                   f"{r['tokens'] / r['wall_s']:,.0f} | {pct(r['ttft'], 50):.0f} | "
                   f"{pct(r['ttft'], 99):.0f} |")  # fmt: skip
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--heavy-tokens", type=int, default=64)
    ap.add_argument("--light-tokens", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--stats-period-s", type=float, default=1.0)
    ap.add_argument("--sample-s", type=float, default=0.1)
    ap.add_argument("--routers", default="load,pow2")
    ap.add_argument("--runs", type=int, default=3, help="repetitions of every router, order alternating")
    ap.add_argument("--checkpoint", default=None, help="text checkpoint to serve (default: the demo model)")
    args = ap.parse_args()

    import ray
    import torch

    torch.set_num_threads(1)
    from ernie_platform.inference.loading import load_model_and_tokenizer
    from ernie_platform.models import save_pretrained

    print(f"CPU: {cpu_model()}; machine: {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.2f} at "
          f"start; Ray {ray.__version__}", flush=True)  # fmt: skip
    model, tok = load_model_and_tokenizer(args.checkpoint)
    reqs = workload(args)
    routers = args.routers.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            ckpt = str(Path(args.checkpoint).resolve())
        else:
            ckpt = str(save_pretrained(model, Path(tmp) / "ernie45-demo", tokenizer=tok))
        del model
        with local_serve() as port:
            rows = []
            for run in range(1, args.runs + 1):
                for router in routers if run % 2 else list(reversed(routers)):
                    rows.append({**run_router(router, ckpt, port, reqs, args), "run": run})
                    print(table(rows[-1:]), flush=True)
    print(f"\nCPU: {cpu_model()}; checkpoint {args.checkpoint or 'demo model, random weights'}; {args.requests} "
          f"requests (1 in 4 heavy: n=4 x {args.heavy_tokens} tokens; others n=1 x {args.light_tokens}), prompts "
          f"{args.prompt_tokens} tokens, {args.concurrency} clients, pd mode with 2 Decode replicas, routing stats "
          f"every {args.stats_period_s} s; load average {os.getloadavg()[0]:.2f} at the end\n")  # fmt: skip
    print(table(rows))
    if args.runs > 1:
        print("\n" + summary(rows, routers))


def summary(rows: list[dict], routers: list[str]) -> str:
    """Medians over the runs with their ranges, per router."""
    out = ["| router | runs | tokens max/mean | wall s | output tok/s | TTFT p50 ms | TTFT p99 ms |",
           "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for router in routers:
        rs = [r for r in rows if r["router"] == router]
        tmm = []
        for r in rs:
            toks = [p["tokens"] for p in r["per"]]
            tmm.append(max(toks) / (sum(toks) / len(toks)) if sum(toks) else float("nan"))
        walls = [r["wall_s"] for r in rs]
        out.append(f"| {router} | {len(rs)} | {med_range(tmm, '.2f')} | {med_range(walls, '.1f')} | "
                   f"{med_range([r['tokens'] / r['wall_s'] for r in rs], ',.0f')} | "
                   f"{med_range([pct(r['ttft'], 50) for r in rs], '.0f')} | "
                   f"{med_range([pct(r['ttft'], 99) for r in rs], '.0f')} |")  # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    main()
