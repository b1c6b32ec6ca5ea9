"""Held-out evaluation of post-training exports on distinct problems, with paired comparisons across seeds.

    # 1. every export: greedy answers to every distinct held-out problem, one JSON per run (per-problem correctness)
    python benchmarks/posttrain_eval.py eval --test-percent 30 --out /tmp/pt_eval/results \\
        /tmp/pt_eval/runs/pt-sft-s0/export /tmp/pt_eval/runs/pt-rlvr-s0/export ...
    # 2. the tables: mean ± sd over seeds and paired tests (runs named pt-ALGO-sSEED)
    python benchmarks/posttrain_eval.py summary /tmp/pt_eval/results/*.json
    # (the training job writes the same per-problem records of its end-of-run evaluation to
    #  <run.storage_path>/<run.name>/eval_problems.json: `summary` reads those files as well)

The held-out set is the built-in task's test split (`ernie_platform.posttrain.tasks`, the same split the training
job uses with `algo.test_percent`), every problem once, in a fixed order; it never contains a training problem.
Evaluation is greedy (temperature 0) with the inference engine, as `algorithms.evaluate_generation` does.

Paired tests (every model answers the same problems): for two algorithms A and B,
* per seed: d_i = correct_A(i) − correct_B(i) over the problems, SE = sd(d)/√n, and McNemar's exact test on the
  discordant problems — this is the evaluation noise of one pair of trained models, not the training noise;
* across seeds: the per-seed differences of accuracy, paired by seed (B of seed s starts from the SFT model of seed
  s), their mean, SE = sd/√k and a paired t-test with k − 1 degrees of freedom — this includes the seed-to-seed
  training noise, so it is the test of "A trains better models than B" (with 3 seeds it has little power).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ALGOS = ("sft", "rlvr", "upo", "dpo")
PAIRS = (("rlvr", "sft"), ("upo", "sft"), ("dpo", "sft"), ("upo", "rlvr"), ("rlvr", "dpo"), ("upo", "dpo"))


def held_out(tasks: list[str], test_percent: int, max_operand: int, n: int) -> list[Any]:
    """Every distinct held-out problem (at most n per the task mix), sorted by prompt."""
    from ernie_platform.posttrain import data as pdata

    common = {"test_percent": test_percent, "distinct": True}
    options = {"arithmetic": {"max_operand": max_operand, **common}, "counting": common}
    items = pdata.builtin_examples("rl", "test", n, 0, tasks, options)
    return sorted(items, key=lambda ex: ex.messages[-1]["content"])


def evaluate(export: str, items: list[Any], reward: str, max_new_tokens: int) -> list[dict[str, Any]]:
    import torch

    from ernie_platform.inference import Engine, SamplingParams
    from ernie_platform.inference.loading import checkpoint_tokenizer
    from ernie_platform.models import load_pretrained
    from ernie_platform.posttrain import data as pdata
    from ernie_platform.posttrain.rewards import exact_match, get_reward, score

    torch.manual_seed(0)
    model = load_pretrained(export, dtype=torch.float32).eval()
    tokenizer = checkpoint_tokenizer(export)
    prompts = [pdata.encode_prompt(tokenizer, ex.messages) for ex in items]
    engine = Engine(model, tokenizer, max_batch_size=64, max_seq_len=max(len(p) for p in prompts) + max_new_tokens)
    with torch.no_grad():
        outs = engine.generate_batch(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0.0))
    fn = get_reward(reward)
    rows = []
    for ex, o in zip(items, outs):
        prompt = ex.messages[-1]["content"]
        rows.append(
            {
                "prompt": prompt,
                "task": ex.task,
                "answer": ex.ground_truth,
                "output": o.text,
                "correct": int(exact_match("", o.text, ex.ground_truth)),
                "reward": score(fn, prompt, o.text, ex.ground_truth)[0],
            }
        )
    return rows


def cmd_eval(args: argparse.Namespace) -> None:
    items = held_out(args.tasks, args.test_percent, args.max_operand, args.n)
    if len({ex.messages[-1]["content"] for ex in items}) != len(items):
        raise SystemExit("held-out problems are not distinct")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for export in args.exports:
        run = Path(export).resolve().parent.name
        t0 = time.time()
        rows = evaluate(export, items, args.reward, args.max_new_tokens)
        acc = sum(r["correct"] for r in rows) / len(rows)
        rew = sum(r["reward"] for r in rows) / len(rows)
        rec = {
            "run": run,
            "export": str(export),
            "tasks": args.tasks,
            "test_percent": args.test_percent,
            "max_operand": args.max_operand,
            "n": len(rows),
            "accuracy": acc,
            "reward": rew,
            "eval_s": time.time() - t0,
            "problems": rows,
        }
        (out / f"{run}.json").write_text(json.dumps(rec))
        print(f"{run}: n={len(rows)} accuracy={acc:.4f} reward={rew:.4f} ({rec['eval_s']:.0f}s)", flush=True)


def _t_p(t: float, df: int) -> float:
    from scipy import stats

    return float(2 * stats.t.sf(abs(t), df))


def _mcnemar_p(b: int, c: int) -> float:
    from scipy import stats

    return float(stats.binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else float("nan")


TRAIN_METRICS = {
    "upo": ("upo/pair_accuracy", "upo/pairs", "accuracy"),
    "rlvr": ("accuracy",),
    "dpo": ("eval/preference_accuracy", "eval/reward_margin"),
    "sft": ("lm_loss",),
}


def mlflow_metrics(dbs: list[str]) -> dict[str, dict[str, float]]:
    """run name → mean over the run's logged points of the metrics in TRAIN_METRICS (read-only, from the jobs'
    MLflow sqlite databases; `eval/*` metrics are logged once, at the end)."""
    import sqlite3

    out: dict[str, dict[str, float]] = {}
    for db in dbs:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        for uuid, name in con.execute("select run_uuid, name from runs where status = 'FINISHED'"):
            m = re.fullmatch(r".*?-(\w+)-s(\d+)", name)
            for key in TRAIN_METRICS.get(m.group(1) if m else "", ()):
                q = "select value, step from metrics where run_uuid=? and key=?"
                rows = con.execute(q, (uuid, key)).fetchall()
                if rows:
                    out.setdefault(name, {})[key] = sum(r[0] for r in rows) / len(rows)
                    late = [v for v, step in rows if step > max(s for _, s in rows) / 2]
                    out[name][f"{key} (2nd half)"] = sum(late) / len(late)
        con.close()
    return out


def cmd_summary(args: argparse.Namespace) -> None:
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for f in args.results:
        rec = json.loads(Path(f).read_text())  # this script's eval output, or a run's eval_problems.json
        rec["problems"] = sorted(rec["problems"], key=lambda r: r["prompt"])
        m = re.fullmatch(r".*?-(\w+)-s(\d+)", rec["run"])
        if m and m.group(1) in ALGOS:
            runs[(m.group(1), int(m.group(2)))] = rec
    # an SFT job's records carry no task (SFT examples have none): take it from another run's record of the prompt
    task_of = {r["prompt"]: r["task"] for rec in runs.values() for r in rec["problems"] if r.get("task")}
    for rec in runs.values():
        for r in rec["problems"]:
            r["task"] = r.get("task") or task_of.get(r["prompt"], "unknown")
    prompts = {tuple(r["prompt"] for r in rec["problems"]) for rec in runs.values()}
    if len(prompts) != 1:
        raise SystemExit("the runs were not evaluated on the same problems")
    n = len(next(iter(prompts)))
    tasks = sorted({r["task"] for rec in runs.values() for r in rec["problems"]})
    print(f"held-out: {n} distinct problems ({', '.join(tasks)}); runs: {len(runs)}\n")
    print("| algorithm | seeds | accuracy per seed | accuracy mean ± sd | reward mean ± sd |")
    print("|---|---|---|---:|---:|")
    for a in ALGOS:
        seeds = sorted(s for (b, s) in runs if b == a)
        if not seeds:
            continue
        acc = [runs[(a, s)]["accuracy"] for s in seeds]
        rew = [runs[(a, s)]["reward"] for s in seeds]
        per = ", ".join(f"{x:.3f}" for x in acc)
        print(
            f"| {a.upper()} | {','.join(map(str, seeds))} | {per} | {statistics.mean(acc):.3f} ± {_sd(acc):.3f} "
            f"| {statistics.mean(rew):.3f} ± {_sd(rew):.3f} |"
        )
    if len(tasks) > 1:
        for t in tasks:
            print(f"\n{t}:")
            for a in ALGOS:
                accs = []
                for (b, _s), rec in sorted(runs.items()):
                    if b == a:
                        rows = [r for r in rec["problems"] if r["task"] == t]
                        accs.append(sum(r["correct"] for r in rows) / len(rows))
                if accs:
                    print(f"  {a}: {statistics.mean(accs):.3f} ± {_sd(accs):.3f} (n={len(rows)})")
    print("\nPaired comparisons (difference of held-out exact match, A − B):\n")
    print("| A − B | per seed: diff (SE, McNemar p) | across seeds: mean diff ± SE | t (df) | p |")
    print("|---|---|---:|---:|---:|")
    for a, b in PAIRS:
        seeds = sorted(s for (x, s) in runs if x == a and (b, s) in runs)
        if not seeds:
            continue
        diffs, cells = [], []
        for s in seeds:
            ca = [r["correct"] for r in runs[(a, s)]["problems"]]
            cb = [r["correct"] for r in runs[(b, s)]["problems"]]
            d = [x - y for x, y in zip(ca, cb)]
            mean = sum(d) / n
            se = _sd(d) / math.sqrt(n)
            p = _mcnemar_p(sum(1 for x in d if x > 0), sum(1 for x in d if x < 0))
            diffs.append(mean)
            cells.append(f"s{s}: {mean:+.3f} ({se:.3f}, p={p:.2g})")
        k = len(diffs)
        mean = statistics.mean(diffs)
        if k > 1:
            se = _sd(diffs) / math.sqrt(k)
            t = mean / se if se > 0 else float("inf")
            tail = f"{mean:+.3f} ± {se:.3f} | {t:.2f} ({k - 1}) | {_t_p(t, k - 1):.3f}"
        else:
            tail = f"{mean:+.3f} | – | –"
        print(f"| {a.upper()} − {b.upper()} | {'; '.join(cells)} | {tail} |")
    same = [
        (a, s, t) for a in ALGOS for s in range(100) for t in range(s + 1, 100) if (a, s) in runs and (a, t) in runs
    ]
    if same:
        print("\nSeed against seed, same algorithm (training noise on these problems):\n")
        for a, s, t in same:
            ca = [r["correct"] for r in runs[(a, t)]["problems"]]
            cb = [r["correct"] for r in runs[(a, s)]["problems"]]
            d = [x - y for x, y in zip(ca, cb)]
            p = _mcnemar_p(sum(1 for x in d if x > 0), sum(1 for x in d if x < 0))
            print(f"- {a.upper()} s{t} − s{s}: {sum(d) / n:+.3f} (SE {_sd(d) / math.sqrt(n):.3f}, McNemar p={p:.2g})")
    if args.mlflow:
        print("\nTraining metrics (MLflow, mean over the logged points of each run; mean ± sd over seeds):\n")
        tm = mlflow_metrics(args.mlflow)
        for a in ALGOS:
            for key in [k for m in TRAIN_METRICS[a] for k in (m, f"{m} (2nd half)")]:
                vals = {
                    s: tm[rec["run"]][key]
                    for (b, s), rec in sorted(runs.items())
                    if b == a and key in tm.get(rec["run"], {})
                }
                if vals:
                    per = ", ".join(f"s{s} {v:.3f}" for s, v in vals.items())
                    xs = list(vals.values())
                    print(f"- {a.upper()} {key}: {statistics.mean(xs):.3f} ± {_sd(xs):.3f} ({per})")
    if args.walltimes:
        print("\nWall time per job (s), mean ± sd over seeds:\n")
        walls = [json.loads(line) for line in Path(args.walltimes).read_text().splitlines() if line.strip()]
        for a in ALGOS:
            xs = {w["seed"]: float(w["wall_s"]) for w in walls if w["algo"] == a and w.get("rc") in (0, None)}
            if xs:
                per = ", ".join(f"s{s} {v:.0f}" for s, v in sorted(xs.items()))
                print(f"- {a.upper()}: {statistics.mean(xs.values()):.0f} ± {_sd(list(xs.values())):.0f} ({per})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("eval", help="evaluate exports on every distinct held-out problem")
    ev.add_argument("exports", nargs="+")
    ev.add_argument("--out", required=True)
    ev.add_argument("--tasks", nargs="+", default=["arithmetic"])
    ev.add_argument("--test-percent", type=int, default=10)
    ev.add_argument("--max-operand", type=int, default=50)
    ev.add_argument("--n", type=int, default=4000, help="at most this many problems (the whole split if fewer)")
    ev.add_argument("--reward", default="arithmetic")
    ev.add_argument("--max-new-tokens", type=int, default=4)
    sm = sub.add_parser("summary", help="tables and paired tests from the eval JSONs (runs named *-ALGO-sSEED)")
    sm.add_argument("results", nargs="+")
    sm.add_argument("--mlflow", nargs="*", default=[], help="the jobs' mlflow.db files (training metrics)")
    sm.add_argument("--walltimes", help="jsonl of {run, algo, seed, wall_s}")
    args = ap.parse_args(argv)
    cmd_eval(args) if args.cmd == "eval" else cmd_summary(args)


if __name__ == "__main__":
    sys.exit(main())
