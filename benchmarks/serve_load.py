"""Serving load benchmark: the Ray Serve OpenAI app (pd and colocated, native engine; colocated with the vLLM
backend) and bare vLLM's own OpenAI server under loopback load, against transformers' batched `generate` on the
same model and the same total tokens, in one run.

Run from the repository root:

    python benchmarks/serve_load.py --checkpoint runs/<run>/export   # a trained checkpoint (what the docs report)
    python benchmarks/serve_load.py              # demo model, prompt 128 / output 128 tokens, concurrency 1, 8, 32
    python benchmarks/serve_load.py --quick      # smoke setting (< 2 min): short prompts and outputs, few requests
    python benchmarks/serve_load.py --mixed      # output lengths spread over [32, 224] (mean 128) instead of all 128
    python benchmarks/serve_load.py --systems pd colocated           # without the vLLM rows

What is measured, in this order, on one machine:

* model: `--checkpoint` (a transformers-layout ERNIE text checkpoint with a byte-level tokenizer, e.g. an export of
  the text stage or of post-training), else the demo MoE (`conf/model/ernie45_demo_moe.yaml`, random weights from
  the fixed demo seed: every request then emits the same token and touches 2 of 16 experts, so prefer a trained
  one), saved once to a temporary checkpoint that every party loads;
* bare prefill: one forward of the benchmark prompt through the model (1 torch thread, as in a replica), median;
* transformers: `AutoModelForCausalLM.from_pretrained(ckpt).generate(batch, do_sample=False,
  max_new_tokens=M, min_new_tokens=M)` on batches of 32 prompts until the total tokens of the concurrency-32 level
  are generated (or `--baseline-budget-s` runs out, at least one batch), once per `--baseline-threads` setting
  (torch intra-op threads; on a shared 2-core box more threads can be far slower). The fastest is the reference.
  With `--mixed` a batch runs to its longest request (M = that length) and only each request's own tokens count;
* engine in-process: `Engine.generate_batch` of the same requests (1 thread, no HTTP, no Ray): the floor of the
  serving path;
* everything runs at Ray's worker niceness (15), as the replicas do, so other load on the machine hits both sides
  alike;
* serving (`--systems`): a local Ray instance, Serve on a loopback port, the apps deployed at once (`pd`: Ingress
  -> Prefill -> Decode; `colocated`: Ingress -> Engine; `vllm-colocated`: Ingress -> Engine with
  `serve.engine.backend=vllm`; the repo's default `conf/serve/default.yaml` otherwise), and `vllm`: bare vLLM's
  OpenAI server (`python -m vllm.entrypoints.openai.api_server`, the checkpoint's dtype, max model length and max
  sequences as the app's engine, `VLLM_CPU_KVCACHE_SPACE` as `serve.engine.vllm.kv_cache_gib`) started by this
  script, so at the same niceness as everything else; then for each system and each concurrency C a warm-up and
  `requests`
  streamed `/v1/completions` calls (greedy, `ignore_eos`, so every request generates exactly M tokens) from C
  concurrent clients in this process (aiohttp, raw SSE parsing: the openai client's per-chunk parsing would take CPU
  from the server on a 2-core machine). All servers stay up for the whole run; only one is loaded at a time.

Repetition (`--runs R`, default 3): every (mode, concurrency) level is measured R times, interleaved (run 1 of every
level, then run 2, ...), so that slow drift of the machine hits every level alike; the table reports each figure as
the median over the R runs with its range [min-max], and a level has at least `--min-requests` (default 32)
requests, so TTFT percentiles at concurrency 1 come from >= 32 requests per run.

Per request: TTFT = request sent -> first chunk carrying a token; TPOT = (last token - first token) / (M - 1); ITL =
gaps between chunks, a chunk of k tokens counting k gaps of 1/k each. Per level: output tok/s = generated tokens /
wall time of the level, req/s likewise; percentiles over all requests (ITL: over all gaps).

Verdicts (printed; the script never fails on them): concurrency-32 output tok/s >= 3x the transformers reference,
and TTFT p50 at concurrency 1 within 50 ms of the bare prefill forward; against bare vLLM (issues #17, #18): the
vLLM backend colocated >= 0.9x its tok/s at the top concurrency and TTFT p50 at concurrency 1 <= its + 15 ms; the
native engine colocated >= 0.8x its tok/s, ITL p50 at concurrency 1 <= 1.25x its, TTFT p50 at concurrency 1 <= its
+ 20 ms. Results: docs/benchmarks.md ("Serving").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

if __package__ in (None, ""):  # `python benchmarks/serve_load.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_model  # noqa: E402

TARGET_SPEEDUP = 3.0
TARGET_TTFT_MS = 50.0
# Ray Serve apps: system -> (route prefix, overrides)
APPS = {
    "pd": ("/pd", {"serve.mode": "pd"}),
    "colocated": ("/colo", {"serve.mode": "colocated"}),
    "vllm-colocated": ("/vllm", {"serve.mode": "colocated", "serve.engine.backend": "vllm"}),
}
SYSTEMS = (*APPS, "vllm")  # vllm: bare vLLM's OpenAI server
LABELS = {"pd": "serve pd", "colocated": "serve colocated", "vllm-colocated": "serve colocated, vLLM backend",
          "vllm": "bare vLLM server"}  # fmt: skip


@dataclass
class Level:
    setting: str
    concurrency: int
    requests: int
    wall_s: float
    tokens: int
    ttft_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
    errors: int = 0
    run: int = 1

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def req_s(self) -> float:
        return self.requests / self.wall_s if self.wall_s else 0.0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def prompt_text(i: int, n: int) -> str:
    """A prompt of exactly n tokens with the byte-level tokenizer (ASCII), different per request."""
    base = f"Request {i}: the quick brown fox jumps over the lazy dog. "
    return (base * (n // len(base) + 1))[:n]


# ---- baselines -------------------------------------------------------------------------------------------------------
def bare_prefill_ms(model: Any, ids: list[int], iters: int) -> float:
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(2):
            model(x)
        ts = []
        for _ in range(iters):
            t = time.perf_counter()
            model(x)
            ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000


def output_lengths(n: int, m: int, mixed: bool) -> list[int]:
    """Output tokens of request i: m, or (--mixed) spread over [m/4, 7m/4] with mean ~m (deterministic)."""
    if not mixed:
        return [m] * n
    return [max(1, round(m * (0.25 + 1.5 * ((i * 0.6180339887) % 1.0)))) for i in range(n)]


def hf_generate(ckpt: str, prompts: list[list[int]], lens: list[int], threads: int, budget_s: float
                ) -> tuple[float, int]:  # fmt: skip
    """(useful tokens/s, useful tokens) of transformers' batched greedy generate, batches of 32, within the time
    budget. A batch runs until its longest request is done; a request's tokens past its own length are waste."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    hf = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        hf.generate(torch.tensor(prompts[:2]), do_sample=False, max_new_tokens=2, min_new_tokens=2)  # warm-up
        done, t0 = 0, time.perf_counter()
        for i in range(0, len(prompts), 32):
            batch = torch.tensor(prompts[i : i + 32])  # same length: no padding
            m = max(lens[i : i + 32])
            hf.generate(batch, do_sample=False, max_new_tokens=m, min_new_tokens=m)
            done += sum(lens[i : i + 32])
            if time.perf_counter() - t0 > budget_s:
                break
        dt = time.perf_counter() - t0
    return done / dt, done


def engine_in_process(model: Any, tok: Any, prompts: list[list[int]], lens: list[int]) -> tuple[float, int]:
    from ernie_platform.inference import Engine, SamplingParams

    eng = Engine(model, tok, max_batch_size=32, max_seq_len=len(prompts[0]) + max(lens))
    p = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in lens]
    eng.generate_batch(prompts[:2], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    t0 = time.perf_counter()
    out = eng.generate_batch(prompts, p)
    dt = time.perf_counter() - t0
    n = sum(len(c.output_ids) for c in out)
    return n / dt, n


# ---- load generator --------------------------------------------------------------------------------------------------
async def one_request(session: Any, url: str, model: str, prompt: str, m: int) -> tuple[float, list[tuple[float, int]]]:
    """One greedy streamed completion of exactly `m` tokens (see `stream_completion`)."""
    body = {"model": model, "prompt": prompt, "max_tokens": m, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    return await stream_completion(session, url, body)


async def stream_completion(session: Any, url: str, body: dict[str, Any]) -> tuple[float, list[tuple[float, int]]]:
    """(send time, [(arrival time, tokens in chunk)]) of one streamed /v1/completions call (`body` with
    `return_token_ids`), read as raw SSE: cheap on the client side."""
    t0 = time.perf_counter()
    arrivals = []
    async with session.post(f"{url}/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            k = sum(len(c.get("token_ids") or []) for c in chunk["choices"])
            if k:
                arrivals.append((time.perf_counter(), k))
    return t0, arrivals


async def run_level(url: str, model: str, setting: str, conc: int, n: int, p: int, lens: list[int], warmup: int
                    ) -> Level:  # fmt: skip
    # aiohttp (a dependency of ray[default]) rather than the openai client: its per-chunk parsing cost would be
    # taken from the same 2 cores as the server's.
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(one_request(session, url, model, prompt_text(i, p), lens[i]) for i in range(warmup)))
        queue = list(range(n))
        results: list[Any] = []
        errors = 0

        async def worker() -> None:
            nonlocal errors
            while queue:
                i = queue.pop()
                try:
                    results.append(await one_request(session, url, model, prompt_text(i, p), lens[i]))
                except Exception as e:  # reported, not fatal: the benchmark must finish
                    errors += 1
                    print(f"  request failed: {type(e).__name__}: {e}", flush=True)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        wall = time.perf_counter() - t0
    lv = Level(setting, conc, len(results), wall, sum(k for _, arr in results for _, k in arr), errors=errors)
    for sent, arr in results:
        if not arr:
            continue
        lv.ttft_ms.append((arr[0][0] - sent) * 1000)
        ntok = sum(k for _, k in arr)
        if ntok > 1:
            lv.tpot_ms.append((arr[-1][0] - arr[0][0]) / (ntok - 1) * 1000)
        prev = arr[0][0]
        if arr[0][1] > 1:
            lv.itl_ms += [0.0] * (arr[0][1] - 1)
        for t, k in arr[1:]:
            lv.itl_ms += [(t - prev) / k * 1000] * k
            prev = t
    return lv


@contextlib.contextmanager
def local_serve() -> Iterator[int]:
    """A local Ray instance with Serve on a free loopback port (yielded); Serve and Ray are shut down after."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_SERVE_PROXY_USE_GRPC", "1")  # as `python -m workloads.serve` does (docs/serving.md)
    # logical CPUs for every replica of the apps at once (each app's default asks for up to 1.75)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
        serve.shutdown()
    finally:
        ray.shutdown()


@contextlib.contextmanager
def bare_vllm(ckpt: str, name: str, max_len: int, max_seqs: int, kv_gib: int, eager: bool) -> Iterator[int]:
    """vLLM's own OpenAI server on a free loopback port (yielded) for the checkpoint; stopped after. Started from
    this process, so at its niceness. `vllm serve` is not used: the CLI looks up the distribution `vllm`, and on
    CPU it is installed as `vllm-cpu` (docs/serving.md)."""
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from ernie_platform.serving.vllm_engine import checkpoint_dtype

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", ckpt, "--served-model-name", name,
           "--dtype", checkpoint_dtype(ckpt), "--max-model-len", str(max_len), "--max-num-seqs", str(max_seqs),
           "--host", "127.0.0.1", "--port", str(port), "--disable-log-stats"]  # fmt: skip
    if eager:
        cmd.append("--enforce-eager")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}
    log = open(Path(tempfile.gettempdir()) / f"serve_load_vllm_{port}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bare vLLM exited with {proc.returncode}; log: {log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"bare vLLM did not start in 900 s; log: {log.name}")
            time.sleep(1.0)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def serve_levels(ckpt: str, args: argparse.Namespace, lens: list[int]) -> list[Level]:
    from ray import serve

    from ernie_platform.serving.app import model_name_for
    from workloads.serve.app import build_app

    name = model_name_for(ckpt)
    max_len = args.prompt_tokens + max(lens)
    with contextlib.ExitStack() as stack:
        urls = {}
        apps = [s for s in args.systems if s in APPS]
        if apps:
            port = stack.enter_context(local_serve())
            common = {"model.path": ckpt, "serve.engine.max_seq_len": max_len,
                      "serve.engine.max_batch_size": args.max_seqs, "serve.engine.vllm.kv_cache_gib": args.vllm_kv_gib,
                      "serve.engine.vllm.enforce_eager": args.vllm_eager,
                      **dict(kv.split("=", 1) for kv in args.app_override)}  # fmt: skip
            t0 = time.perf_counter()
            serve.run_many([serve.RunTarget(build_app({**common, **APPS[s][1]}), name=s, route_prefix=APPS[s][0])
                            for s in apps])  # fmt: skip
            print(f"serve: {', '.join(apps)} up in {time.perf_counter() - t0:.1f} s (port {port})", flush=True)
            urls.update({s: f"http://127.0.0.1:{port}{APPS[s][0]}/v1" for s in apps})
        if "vllm" in args.systems:
            t0 = time.perf_counter()
            vport = stack.enter_context(bare_vllm(ckpt, name, max_len, args.max_seqs, args.vllm_kv_gib,
                                                  args.vllm_eager))  # fmt: skip
            print(f"bare vLLM: up in {time.perf_counter() - t0:.1f} s (port {vport})", flush=True)
            urls["vllm"] = f"http://127.0.0.1:{vport}/v1"
        levels = []
        for run in range(1, args.runs + 1):  # interleaved: run r of every level before run r + 1 of any
            for system in args.systems:
                for conc in args.concurrency:
                    n = max(conc * args.rounds, args.min_requests)
                    lv = asyncio.run(run_level(urls[system], name, LABELS[system], conc, n, args.prompt_tokens, lens,
                                               min(conc, 4)))  # fmt: skip
                    lv.run = run
                    print(f"  run {run}: {lv.setting} conc {conc}: {lv.tok_s:,.0f} tok/s, TTFT p50 "
                          f"{pct(lv.ttft_ms, 50):.1f} ms, ITL p50 {pct(lv.itl_ms, 50):.1f} ms", flush=True)  # fmt: skip
                    levels.append(lv)
    return levels


def vs_vllm(levels: list[Level], top: int) -> list[str]:
    """The targets against bare vLLM measured in the same run (medians over the runs)."""

    def med(system: str, conc: int, what: str) -> float:
        runs = [lv for lv in levels if lv.setting == LABELS[system] and lv.concurrency == conc]
        if not runs:
            return float("nan")
        if what == "tok_s":
            return statistics.median(lv.tok_s for lv in runs)
        return statistics.median(pct(getattr(lv, what), 50) for lv in runs)

    out = []
    ref_rate, ref_ttft, ref_itl = med("vllm", top, "tok_s"), med("vllm", 1, "ttft_ms"), med("vllm", 1, "itl_ms")
    if math.isnan(ref_rate):
        return out
    what = f"tok/s at conc {top}"
    checks = [  # (system, what, ratio to bare vLLM, target text, bound: None = reported only)
        ("vllm-colocated", what, med("vllm-colocated", top, "tok_s") / ref_rate, ">= 0.9x", 0.9),
        ("colocated", what, med("colocated", top, "tok_s") / ref_rate, ">= 0.8x", 0.8),
        ("pd", what, med("pd", top, "tok_s") / ref_rate, "(reported)", None),
    ]
    for system, what, x, target, bound in checks:
        if not math.isnan(x):
            verdict = "" if bound is None else (" -> PASS" if x >= bound else " -> MISS")
            out.append(f"{system}: {what} = {x:.2f}x bare vLLM ({ref_rate:,.0f} tok/s), target {target}{verdict}")
    for system, slack in (("vllm-colocated", 15.0), ("colocated", 20.0)):
        d = med(system, 1, "ttft_ms") - ref_ttft
        if not math.isnan(d):
            out.append(f"{system}: TTFT p50 at conc 1 = bare vLLM's {ref_ttft:.1f} ms {d:+.1f} ms, target <= "
                       f"+{slack:.0f} ms -> {'PASS' if d <= slack else 'MISS'}")  # fmt: skip
    itl = med("colocated", 1, "itl_ms") / ref_itl
    if not math.isnan(itl):
        out.append(f"colocated: ITL p50 at conc 1 = {itl:.2f}x bare vLLM's {ref_itl:.1f} ms, target <= 1.25x -> "
                   f"{'PASS' if itl <= 1.25 else 'MISS'}")  # fmt: skip
    return out


# ---- report ----------------------------------------------------------------------------------------------------------
def med_range(xs: list[float], fmt: str) -> str:
    """Median of the runs' values with their range: `m [lo-hi]` (just `m` for one run)."""
    m = format(statistics.median(xs), fmt)
    return m if len(xs) == 1 else f"{m} [{format(min(xs), fmt)}-{format(max(xs), fmt)}]"


def table(levels: list[Level]) -> str:
    """One row per (setting, concurrency): each figure is the median over the runs, with the range in brackets."""
    head = ("| setting | conc | runs | requests/run | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms "
            "| ITL p50 ms | ITL p99 ms | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    groups: dict[tuple[str, int], list[Level]] = {}
    for lv in levels:
        groups.setdefault((lv.setting, lv.concurrency), []).append(lv)
    rows = []
    for (setting, conc), runs in groups.items():
        f = {
            "req_s": [lv.req_s for lv in runs],
            "tok_s": [lv.tok_s for lv in runs],
            "ttft50": [pct(lv.ttft_ms, 50) for lv in runs],
            "ttft99": [pct(lv.ttft_ms, 99) for lv in runs],
            "tpot50": [pct(lv.tpot_ms, 50) for lv in runs],
            "itl50": [pct(lv.itl_ms, 50) for lv in runs],
            "itl99": [pct(lv.itl_ms, 99) for lv in runs],
        }
        rows.append(
            f"| {setting} | {conc} | {len(runs)} | {runs[0].requests} | {med_range(f['req_s'], '.2f')} | "
            f"{med_range(f['tok_s'], ',.0f')} | {med_range(f['ttft50'], '.1f')} | {med_range(f['ttft99'], '.1f')} | "
            f"{med_range(f['tpot50'], '.1f')} | {med_range(f['itl50'], '.1f')} | {med_range(f['itl99'], '.1f')} | "
            f"{sum(lv.errors for lv in runs)} |"
        )
    return "\n".join([head, *rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (ignore_eos)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=3, help="requests per level = max(conc x rounds, --min-requests)")
    p.add_argument("--min-requests", type=int, default=32, help="at least this many requests per level and run")
    p.add_argument("--runs", type=int, default=3, help="interleaved repetitions of every level (medians, ranges)")
    p.add_argument("--baseline-threads", type=int, nargs="+", default=None,
                   help="torch threads for transformers (default: 1 and the machine's default)")  # fmt: skip
    p.add_argument("--baseline-budget-s", type=float, default=120.0)
    p.add_argument("--mixed", action="store_true", help="output lengths spread over [M/4, 7M/4] instead of all M")
    p.add_argument("--quick", action="store_true", help="smoke setting: prompt 32, output 16, 1 round, < 2 min")
    p.add_argument("--checkpoint", type=str, default=None, help="text checkpoint to serve (default: the demo model)")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS,
                   help="what to load (default: all; the vLLM ones only when vLLM is installed)")  # fmt: skip
    p.add_argument("--max-seqs", type=int, default=32, help="sequences decoded together, every engine")
    p.add_argument("--vllm-kv-gib", type=int, default=1, help="vLLM's CPU KV cache (GiB), both vLLM systems")
    p.add_argument("--vllm-eager", action="store_true", help="both vLLM systems without torch.compile (--quick)")
    p.add_argument("--app-override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every Serve app (serve.engine.vllm.stream_interval_ms=20)")  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.quick:
        args.prompt_tokens, args.max_tokens, args.rounds, args.min_requests, args.runs = 32, 16, 1, 4, 2
        args.baseline_budget_s = 20.0
        args.vllm_eager = True
    import importlib.util

    if importlib.util.find_spec("vllm") is None and any(s.startswith("vllm") for s in args.systems):
        print("vLLM is not installed: leaving out the vllm systems (docs/serving.md, vLLM backend)", flush=True)
        args.systems = [s for s in args.systems if not s.startswith("vllm")]
    # Ray starts its workers (the replicas, the HTTP proxy) at niceness RAY_worker_niceness (15). Everything here runs
    # at the same priority, so background load from other processes takes its share from serving and baselines alike.
    os.nice(max(0, int(os.environ.get("RAY_worker_niceness", "15")) - os.nice(0)))
    import ray
    import torch
    import transformers

    default_threads = torch.get_num_threads()
    threads = args.baseline_threads or sorted({1, default_threads})
    torch.set_num_threads(1)
    from ernie_platform.inference.loading import load_model_and_tokenizer
    from ernie_platform.models import save_pretrained

    print(f"CPU: {cpu_model()}; "
          f"machine: {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.2f} at start; torch "
          f"{torch.__version__} (default threads {default_threads}), Ray {ray.__version__}, transformers "
          f"{transformers.__version__}; niceness {os.nice(0)}", flush=True)  # fmt: skip
    model, tok = load_model_and_tokenizer(args.checkpoint)
    total_reqs = max(max(args.concurrency) * args.rounds, args.min_requests)
    prompts = [tok.encode(prompt_text(i, args.prompt_tokens)) for i in range(total_reqs)]
    lens = output_lengths(total_reqs, args.max_tokens, args.mixed)
    assert all(len(x) == args.prompt_tokens for x in prompts)
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            ckpt = str(Path(args.checkpoint).resolve())
        else:
            ckpt = str(save_pretrained(model, Path(tmp) / "ernie45-demo", tokenizer=tok))
        prefill_ms = bare_prefill_ms(model, prompts[0], 5 if args.quick else 20)
        print(f"bare prefill forward ({args.prompt_tokens} tokens, 1 thread): {prefill_ms:.1f} ms", flush=True)
        eng_rate, eng_tokens = engine_in_process(model, tok, prompts, lens)
        print(f"engine in-process: {eng_rate:,.0f} tok/s ({eng_tokens} tokens)", flush=True)
        hf = {}
        for th in threads:
            hf[th] = hf_generate(ckpt, prompts, lens, th, args.baseline_budget_s)
            print(f"transformers generate, {th} thread(s): {hf[th][0]:,.0f} tok/s ({hf[th][1]} tokens)", flush=True)
        torch.set_num_threads(1)
        levels = serve_levels(ckpt, args, lens)
    ref_threads = max(hf, key=lambda th: hf[th][0])
    ref = hf[ref_threads][0]
    shape = f"{min(lens)}-{max(lens)} (mean {statistics.mean(lens):.0f})" if args.mixed else str(args.max_tokens)
    print(f"\nprompt {args.prompt_tokens} tokens, output {shape} tokens per request; load average "
          f"{os.getloadavg()[0]:.2f} at the end\n")  # fmt: skip
    print(f"CPU: {cpu_model()}; checkpoint {args.checkpoint or 'demo model, random weights'}\n")
    print(table(levels))
    print("\n| baseline | output tok/s |\n|---|---:|")
    print(f"| engine in-process (Engine.generate_batch, 1 thread) | {eng_rate:,.0f} |")
    for th, (rate, _) in hf.items():
        print(f"| transformers batched generate, {th} thread(s){' (reference)' if th == ref_threads else ''} "
              f"| {rate:,.0f} |")  # fmt: skip
    print(f"| bare prefill forward, ms | {prefill_ms:.1f} |\n")
    verdicts = []
    for mode in [s for s in args.systems if s in ("pd", "colocated")]:
        top = [lv for lv in levels if lv.setting == LABELS[mode] and lv.concurrency == max(args.concurrency)]
        one = [lv for lv in levels if lv.setting == LABELS[mode] and lv.concurrency == 1]
        if top:  # medians over the runs
            rate = statistics.median(lv.tok_s for lv in top)
            x = rate / ref
            verdicts.append(f"{mode}: conc {top[0].concurrency} {rate:,.0f} tok/s (median of {len(top)} runs) = "
                            f"{x:.2f}x transformers ({ref:,.0f} tok/s) -> {'PASS' if x >= TARGET_SPEEDUP else 'MISS'} "
                            f"(target >= {TARGET_SPEEDUP:.0f}x)")  # fmt: skip
        if one:
            d = statistics.median(pct(lv.ttft_ms, 50) for lv in one) - prefill_ms
            ok = "PASS" if d <= TARGET_TTFT_MS else "MISS"
            verdicts.append(f"{mode}: TTFT p50 at conc 1 = bare prefill + {d:.1f} ms -> {ok} (target <= "
                            f"+{TARGET_TTFT_MS:.0f} ms)")  # fmt: skip
    verdicts += vs_vllm(levels, max(args.concurrency))
    print("verdict:\n  " + "\n  ".join(verdicts))
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "levels": [{**asdict(lv), "tok_s": lv.tok_s, "req_s": lv.req_s} for lv in levels],
            "engine_in_process_tok_s": eng_rate, "transformers_tok_s": {str(k): v[0] for k, v in hf.items()},
            "bare_prefill_ms": prefill_ms, "verdicts": verdicts,
        }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
