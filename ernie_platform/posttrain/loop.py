"""The post-training loop that runs in every Ray Train worker (`train_loop_per_worker`), for every algorithm.

It reuses the pretraining machinery as is: `strategy.build_engine` (DeepSpeed ZeRO, AdamW, LR schedule),
`checkpointing` (Ray Train checkpoints with weights, optimizer, scheduler, loop state and RNG; resume after a worker
failure), `tracking.RankZeroLogger` (MLflow from rank 0), the driver's progress board and `loop._export`
(transformers-layout export). What differs is the data and the loss of each algorithm (`algorithms`) and, for RLVR
and UPO, the rollout actors (`rollout.RolloutPool`, created by rank 0; rollouts and rewards are broadcast to every
rank, and each rank trains on its share of the prompt groups).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ernie_platform.posttrain import algorithms as algos
from ernie_platform.posttrain.policy import (
    build_reference,
    environment_threads,
    load_policy,
    merged_state_dict,
    reference_of,
    start_of,
)
from ernie_platform.training import checkpointing
from ernie_platform.training.loop import (
    _allreduce_mean,
    _data_metrics,
    _eta_s,
    _export,
    _quiet_ray_train_reports,
    export_dir,
    run_dir,
)
from ernie_platform.training.strategy import build_engine

RL = ("rlvr", "upo")


def _broadcast(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _reward_setup(cfg: dict[str, Any]) -> tuple[Any, Any]:
    from ernie_platform.posttrain.rewards import get_reward

    on_error = cfg["algo"]["reward_on_error"]
    return get_reward(cfg["algo"]["reward"]), (on_error if on_error == "raise" else float(on_error))


def _score_groups(cfg: dict[str, Any], items: list[Any], groups: list[list[Any]], tokenizer: Any) -> tuple:
    """Rewards per rollout (rank 0); failures of the reward function are reported with the sample and scored per
    `algo.reward_on_error`."""
    from ernie_platform.posttrain.rewards import score

    fn, on_error = _reward_setup(cfg)
    rewards, errors = [], []
    for ex, group in zip(items, groups):
        prompt = ex.messages[-1]["content"]
        row = []
        for r in group:
            value, err = score(fn, prompt, r.text, ex.ground_truth, on_error)
            row.append(value)
            if err:
                errors.append(err)
        rewards.append(row)
    return rewards, errors


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    from ernie_platform.data import DataStats

    _quiet_ray_train_reports()
    cfg, t, algo = config["cfg"], config["cfg"]["trainer"], config["cfg"]["algo"]
    name = algo["name"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = bool(t["use_gpu"])
    if not use_gpu:
        environment_threads(int(t["cpus_per_worker"]))
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    start = start_of(cfg, export_dir(cfg))
    model, tokenizer = load_policy(cfg, start)
    if rank == 0:
        print(f"{name}: {start.message}" + (" (LoRA adapters)" if algo["finetune"] == "lora" else ""), flush=True)
    ref_model = build_reference(cfg, model)
    ppo = int(algo["ppo_epochs"]) if name in RL else 1
    ds_cfg = dict(t, max_steps=int(t["max_steps"]) * ppo, grad_accum_steps=1 if name in RL else t["grad_accum_steps"])
    engine, _, scheduler = build_engine(model, ds_cfg, world, use_gpu)
    if ref_model is not None:
        ref_model.to(device)

    def ref_ctx():
        return reference_of(engine.module, ref_model)

    state: dict[str, Any] = {"step": 0, "batches": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state.update(checkpointing.load(engine, checkpoint, rank))
        if rank == 0:
            print(f"resuming from checkpoint at step {state['step']} ({checkpoint.path})", flush=True)

    stats = DataStats()
    batches = None
    rl_items: list[Any] = []
    prompt_ids: list[list[int]] = []
    pool = None
    pair_stream = None
    if name == "sft":
        batches = algos.sft_batches(cfg, tokenizer, rank, world, stats)
    elif name == "dpo":
        batches = algos.dpo_batches(cfg, tokenizer, rank, world, stats)
    else:
        rl_items = algos.examples(cfg, "rl", "train", stats)
        if name == "upo" and algo["upo_pairs"] == "offline":
            pair_stream = algos.dpo_batches(cfg, tokenizer, rank, world, stats)
        if rank == 0:  # rank 0 alone samples the prompts, drives the rollouts and scores them
            from ernie_platform.posttrain import data as pdata
            from ernie_platform.posttrain.rollout import RolloutPool

            prompt_ids = [pdata.encode_prompt(tokenizer, ex.messages) for ex in rl_items]
            pool = RolloutPool(cfg, start.path, run_dir(cfg))
    for _ in range(int(state["batches"])):  # data position: replay the deterministic stream up to the checkpoint
        next(batches if batches is not None else pair_stream)

    logger = None
    if rank == 0 and config.get("tracking_uri"):
        from ernie_platform.training.tracking import RankZeroLogger

        logger = RankZeroLogger(config["tracking_uri"], config["run_id"])
        logger.set_tags({"ernie.start": start.message, "ernie.algo": name})
    progress = config.get("progress")
    max_steps, accum = int(t["max_steps"]), int(t["grad_accum_steps"])
    interval: dict[str, float] = defaultdict(float)
    t_interval, t_start, step_start = time.time(), time.time(), int(state["step"])
    metrics: dict[str, float] = {}
    reward_errors_logged = 0

    engine.train()
    step = int(state["step"])
    while step < max_steps:
        checkpointing.maybe_inject_failure(t, run_dir(cfg), step, rank)
        lr = max(float(g["lr"]) for g in scheduler.optimizer.param_groups)
        if name in ("sft", "dpo"):
            for _ in range(accum):
                batch = {k: v.to(device) for k, v in next(batches).items()}
                state["batches"] = int(state["batches"]) + 1
                if name == "sft":
                    loss, m, n_tok = algos.sft_loss(engine, batch)
                else:
                    loss, m, n_tok = algos.dpo_loss(engine, ref_ctx, batch, algo)
                engine.backward(loss)
                engine.step()
                for k, v in m.items():
                    interval[k] += v / accum
                interval["tokens"] += n_tok
        else:
            payload = None
            if rank == 0:
                t_gen = time.time()
                rng = torch.Generator().manual_seed(int(t["seed"]) * 7_919 + step)
                n_prompts = int(algo["rollout"]["prompts_per_step"])
                chosen = torch.randperm(len(rl_items), generator=rng)[:n_prompts].tolist()
                weights = merged_state_dict(engine.module)
                pool.sync(weights, step)
                groups = pool.generate([prompt_ids[i] for i in chosen], step, int(t["seed"]), weights, step)
                rewards, errors = _score_groups(cfg, [rl_items[i] for i in chosen], groups, tokenizer)
                for err in errors[: max(0, 5 - reward_errors_logged)]:
                    print(f"step {step + 1}: {err}", flush=True)
                reward_errors_logged += len(errors)
                payload = (groups, rewards, len(errors), time.time() - t_gen, pool.restarts)
            groups, rewards, n_err, gen_s, restarts = _broadcast(payload, world)
            mine = slice(rank * len(groups) // world, (rank + 1) * len(groups) // world)
            batch = algos.rl_batch(groups[mine], rewards[mine], algo)
            batch.input_ids, batch.attention_mask, batch.labels = (
                x.to(device) for x in (batch.input_ids, batch.attention_mask, batch.labels)
            )
            pair_batch = None
            if pair_stream is not None:
                pair_batch = {k: v.to(device) for k, v in next(pair_stream).items()}
                state["batches"] = int(state["batches"]) + 1
            for epoch in range(ppo):
                loss, m = algos.rl_loss(engine, ref_ctx, batch, algo, pair_batch)
                engine.backward(loss)
                engine.step()
                if epoch == 0:
                    for k, v in m.items():
                        interval[k] += v
            flat = [x for row in rewards for x in row]
            lengths = [len(ro.output_ids) for g in groups for ro in g]
            interval["reward"] += sum(flat) / len(flat)
            interval["accuracy"] += sum(1.0 for x in flat if x >= 1.0) / len(flat)
            interval["response_length"] += sum(lengths) / len(lengths)
            interval["reward_errors"] += n_err
            interval["rollout_s"] += gen_s
            interval["rollout_restarts"] = float(restarts)
            interval["tokens"] += int(batch.attention_mask.sum())
        norm = engine.get_global_grad_norm()
        if norm is not None:
            interval["grad_norm"] += float(norm)
        step += 1
        state["step"] = step
        interval["steps"] += 1
        last = step == max_steps

        if step % int(t["log_every"]) == 0 or last:
            elapsed = time.time() - t_interval
            n = interval.pop("steps")
            tokens = interval.pop("tokens")
            restarts_now = interval.pop("rollout_restarts", None)
            metrics = _allreduce_mean({k: v / n for k, v in interval.items()}, world)
            tok = _allreduce_mean({"tokens": tokens}, world)["tokens"] * world
            metrics.update({"tokens_per_s": tok / max(elapsed, 1e-9), "step_time_s": elapsed / n, "lr": lr})
            if restarts_now is not None:
                metrics["rollout_restarts"] = restarts_now
            metrics.update(_data_metrics(stats, world))
            if rank == 0:
                if logger is not None:
                    logger.log(metrics, step)
                if progress is not None:
                    rec = {"step": step, "max_steps": max_steps, "loss": metrics.get("loss", float("nan"))}
                    rec.update(tokens_per_s=metrics["tokens_per_s"], eta_s=_eta_s(step, max_steps, step_start, t_start))
                    rec["phase"] = (
                        f"{name} reward {metrics['reward']:.3f} acc {metrics['accuracy']:.3f}" if name in RL else name
                    )
                    progress.update.remote(rec)
            interval, t_interval = defaultdict(float), time.time()

        eval_every = int(algo.get("eval_every") or 0)
        if last or (eval_every and step % eval_every == 0):
            ev = _evaluate(cfg, engine.module, ref_ctx, tokenizer) if rank == 0 else {}
            if rank == 0:
                if logger is not None and ev:
                    logger.log(ev, step)
                print("eval " + " ".join(f"{k}={v:.4f}" for k, v in sorted(ev.items())), flush=True)
            metrics.update(ev)

        every = int(t["checkpoint_every"])
        if last or (every and step % every == 0):
            report = algos.finite(metrics)
            report["step"] = step
            checkpointing.save(engine, dict(state), rank, report)

    if pool is not None:
        pool.shutdown()
    if max_steps <= step_start and rank == 0:
        # A rerun of a finished run (same run.name) re-evaluates its checkpoint: e.g. after changing the eval set.
        print(f"nothing to train: the checkpoint is at step {step_start} >= trainer.max_steps={max_steps}", flush=True)
        ev = _evaluate(cfg, engine.module, ref_ctx, tokenizer)
        print("eval " + " ".join(f"{k}={v:.4f}" for k, v in sorted(ev.items())), flush=True)
        if logger is not None:
            logger.log(ev, step_start)
    target = _finish(engine, cfg, tokenizer, rank, start)
    if rank == 0 and logger is not None:
        logger.set_tags({"ernie.export": target})
        logger.close()


def _evaluate(cfg: dict[str, Any], model: torch.nn.Module, ref_ctx: Any, tokenizer: Any) -> dict[str, float]:
    algo = cfg["algo"]
    if algo["name"] == "dpo":
        items = algos.examples(cfg, "dpo", "test")
        out = algos.evaluate_preferences(model, ref_ctx, tokenizer, items, float(algo["beta"]))
        rl_items = algos.examples(cfg, "rl", "test") if cfg["data"]["source"] == "builtin" else []
    else:
        rl_items = algos.examples(cfg, "rl" if algo["name"] in RL else "sft", "test")
        out = {}
    if rl_items:
        fn, _ = _reward_setup(cfg)
        new_tokens = int(algo["rollout"]["max_new_tokens"])
        rows: list[dict[str, Any]] = []
        out.update(algos.evaluate_generation(model, tokenizer, rl_items, fn, new_tokens, rows))
        # per-problem answers beside the checkpoints, for paired comparisons (benchmarks/posttrain_eval.py)
        rec = {
            "run": cfg["run"]["name"],
            "n": len(rows),
            "accuracy": out["eval/accuracy"],
            "reward": out["eval/reward"],
        }
        where = run_dir(cfg).removeprefix("file://")
        if "://" not in where:  # a local storage path (object stores: the metrics only)
            Path(where).mkdir(parents=True, exist_ok=True)
            Path(where, "eval_problems.json").write_text(json.dumps({**rec, "problems": rows}))
    return out


def _finish(engine: Any, cfg: dict[str, Any], tokenizer: Any, rank: int, start: Any) -> str:
    """Adapters saved on their own (PEFT layout), merged into the weights, then the transformers-layout export."""
    from ernie_platform.posttrain.lora import has_lora, merge_lora, save_adapters
    from ernie_platform.posttrain.policy import lora_config

    model = engine.module
    if has_lora(model):
        if rank == 0 and cfg["algo"]["lora"]["save_adapters"]:
            where = save_adapters(model, Path(run_dir(cfg)) / "adapters", lora_config(cfg), base_model_path=start.path)
            print(f"LoRA adapters saved to {where}", flush=True)
        merge_lora(model)
    return _export(engine, cfg, tokenizer, rank, 1)


__all__ = ["train_loop_per_worker"]
