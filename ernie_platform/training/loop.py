"""The pretraining loop that runs in every Ray Train worker (`train_loop_per_worker`).

Per worker: build the stage's model (`stages.build_stage_model`), shard its experts when `moe.expert_parallel_size`
> 1, wrap it in a DeepSpeed engine (`strategy.build_engine`: ZeRO stage, AdamW, LR schedule with per-group phase
freezing), resume from Ray Train's latest checkpoint if there is one (weights, optimizer, scheduler, step, data
position, RNG), then train `trainer.max_steps` optimizer steps of `grad_accum_steps` micro-batches each. Rank 0
logs metrics to MLflow and sends a progress record to the driver; every `checkpoint_every` steps all ranks save
(`checkpointing.save`). At the end rank 0 evaluates, exports the model in the transformers layout and the job
reports the final checkpoint with the final metrics.

Expert parallelism (`moe.expert_parallel_size` = P > 1, ZeRO stage 0): `kernels.expert_parallel` keeps 1/P of each
MoE layer's experts per rank and moves tokens with all-to-all. DeepSpeed's own gradient all-reduce is switched off
(`enable_backward_allreduce = False`) because it would add up different experts' gradients; the gradients are
reduced by `allreduce_gradients` (replicated parameters over all ranks, expert shards over the expert-data-parallel
group) and clipped here by the global norm (shards' squared norms summed over the EP group). Which experts sit
on which rank — and which hot experts get replicas in `moe.num_redundant_experts` extra slots, re-planned every
`moe.rebalance_interval` steps from the routed loads — is `training.placement.ExpertPlacement`. The export gathers
the experts back into the published layout.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ernie_platform.training import checkpointing
from ernie_platform.training.schedule import phase_at, phase_windows
from ernie_platform.training.stages import (
    build_stage_model,
    is_vl,
    model_summary,
    param_groups,
    train_flops_per_token,
    vision_flops_per_image_token,
)
from ernie_platform.training.strategy import build_engine, sync_expert_load

log = logging.getLogger(__name__)

CPU_PEAK_FLOPS_PER_CORE = 65e9  # fp32 matmul per core on the 2-core dev machine (130 GFLOP/s for both)
GPU_PEAK_FLOPS = 989e12  # H100 SXM dense bf16


def run_dir(cfg: dict[str, Any]) -> str:
    return f"{cfg['run']['storage_path'].rstrip('/')}/{cfg['run']['name']}"


def export_dir(cfg: dict[str, Any]) -> str:
    return f"{run_dir(cfg)}/export"


def _peak_flops(t: dict[str, Any]) -> float:
    if t.get("peak_tflops"):
        return float(t["peak_tflops"]) * 1e12
    return GPU_PEAK_FLOPS if t["use_gpu"] else CPU_PEAK_FLOPS_PER_CORE * int(t["cpus_per_worker"])


def _expert_loads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Tokens routed to each expert in the last forward, per MoE layer (and modality for the VL model)."""
    from ernie_platform.models.moe import MoEBlock
    from ernie_platform.models.vl.moe import VLMoEBlock

    loads: dict[str, torch.Tensor] = {}
    i = 0
    for mod in model.modules():
        if isinstance(mod, MoEBlock) and mod.last_expert_load_E is not None:
            loads[f"layer{i}"] = mod.last_expert_load_E.detach().float()
            i += 1
        elif isinstance(mod, VLMoEBlock):
            for modality, load in mod.last_expert_load.items():
                loads[f"{modality}/layer{i}"] = load.detach().float()
            i += 1
    return loads


def _allreduce_mean(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


def _allreduce_sum_tensors(tensors: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    if world == 1 or not tensors:
        return tensors
    keys = sorted(tensors)
    flat = torch.cat([tensors[k].reshape(-1).float().cpu() for k in keys])
    dist.all_reduce(flat)
    out, o = {}, 0
    for k in keys:
        n = tensors[k].numel()
        out[k] = flat[o : o + n].view_as(tensors[k])
        o += n
    return out


@torch.no_grad()
def _clip_expert_parallel(model: torch.nn.Module, max_norm: float, ep_group: Any) -> float:
    """Global gradient norm with expert shards (squared shard norms summed over the EP group); clips in place."""
    from ernie_platform.kernels.expert_parallel import expert_grad_sq_sum, expert_parameters

    experts = {id(p) for p in expert_parameters(model)}
    dense_sq = torch.zeros((), dtype=torch.float64)
    grads = []
    for p in model.parameters():
        if p.grad is None:
            continue
        grads.append(p.grad)
        if id(p) not in experts:
            dense_sq += p.grad.detach().double().pow(2).sum().cpu()
    expert_sq = expert_grad_sq_sum(model)  # replicas of one expert counted once
    dist.all_reduce(expert_sq, group=ep_group)
    norm = float((dense_sq + expert_sq).sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(scale)
    return norm


def _data_metrics(stats: Any, world: int) -> dict[str, float]:
    """`data/*` counters of the ranks' `DataStats` summed over the ranks (`data/epochs`: their mean)."""
    per_rank = _allreduce_mean({f"data/{k}": float(v) for k, v in stats.as_dict().items()}, world)
    return {k: v if k == "data/epochs" else v * world for k, v in per_rank.items()}


def _eta_s(step: int, max_steps: int, step_start: int, t_start: float) -> float:
    """Seconds left at the rate of the steps run since this (re)start."""
    rate = (step - step_start) / max(time.time() - t_start, 1e-9)
    return (max_steps - step) / max(rate, 1e-9)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _eval_text(model: torch.nn.Module, cfg: dict[str, Any], tokenizer: Any, device: torch.device) -> dict[str, float]:
    """Held-out LM loss of the built-in corpus (documents of another seed) or of the first batches of the data."""
    from ernie_platform.data import make_batches

    t = cfg["trainer"]
    if cfg["data"]["source"] != "builtin":
        return {}
    it = make_batches(cfg["data"], "text", tokenizer, t["micro_batch_size"], t["seq_len"], 0, 1, t["seed"] + 10007)
    was = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for _ in range(4):
            batch = _to_device(next(it), device)
            losses.append(float(model(**batch).lm_loss))
    model.train(was)
    return {"eval/lm_loss": sum(losses) / len(losses)}


def _eval_vl(model: torch.nn.Module, cfg: dict[str, Any], tokenizer: Any) -> dict[str, float]:
    from ernie_platform.data import chance_accuracy, heldout_vl_dataset
    from ernie_platform.data.synthetic_vl import generate_samples, greedy_answers, per_type_accuracy

    heldout = heldout_vl_dataset(cfg["data"], tokenizer, cfg["trainer"]["seed"])
    if heldout is None or len(heldout) == 0:
        return {}
    preds = greedy_answers(model, heldout)
    acc = sum(p == s.answer for p, s in zip(preds, heldout.samples)) / len(heldout)
    # Chance: always answering the train split's most frequent answer per question type (a blind model's best).
    train = generate_samples(2000, cfg["trainer"]["seed"], "train", heldout.image_size)
    out = {"eval/answer_accuracy": acc, "eval/chance_accuracy": chance_accuracy(heldout, reference=train)}
    for qtype, value in per_type_accuracy(preds, heldout).items():
        out[f"eval/answer_accuracy/{qtype}"] = value
    return out


def _export(engine: Any, cfg: dict[str, Any], tokenizer: Any, rank: int, ep: int) -> str:
    """Collective: gather expert shards / ZeRO-3 partitions, then rank 0 writes the transformers-layout export."""
    from ernie_platform.models import save_pretrained

    target = export_dir(cfg)
    model = engine.module
    if ep > 1:
        from ernie_platform.kernels.expert_parallel import gather_experts

        gather_experts(model)
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank == 0:
                _write_export(save_pretrained, model, target, tokenizer, int(cfg["trainer"]["seq_len"]))
    elif rank == 0:
        _write_export(save_pretrained, model, target, tokenizer, int(cfg["trainer"]["seq_len"]))
    if dist.is_initialized():
        dist.barrier()
    return target


def _write_export(save_pretrained: Any, model: torch.nn.Module, target: str, tokenizer: Any, seq_len: int) -> None:
    def write(path: Path) -> None:
        save_pretrained(model, path, tokenizer=tokenizer)
        if is_vl(model):  # the image processing of training, for whoever serves or fine-tunes the export
            from ernie_platform.data.pipeline import image_processor_config

            vision = model.cfg.vision
            proc = image_processor_config(vision.patch_size, vision.spatial_merge_size, seq_len)
            (path / "preprocessor_config.json").write_text(json.dumps(proc.to_dict(), indent=2) + "\n")

    if "://" in target and not target.startswith("file://"):
        import tempfile

        import pyarrow.fs as pafs

        with tempfile.TemporaryDirectory() as tmp:
            write(Path(tmp) / "export")
            pafs.copy_files(str(Path(tmp) / "export"), target)
    else:
        write(Path(target.removeprefix("file://")))


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report (all metrics) and every checkpoint at INFO from each worker, which buries the
    driver's progress line; the job prints and tracks those itself."""
    import importlib

    for module in ("ray.train.v2._internal.execution.context", "ray.train.v2._internal.execution.storage"):
        try:
            mod = importlib.import_module(module)
        except ImportError:  # another Ray version: keep its logging as is
            continue
        for name in {mod.__name__, getattr(mod, "__file__", "")}:
            if name:
                logging.getLogger(name).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: `config` = {"cfg": resolved config (plain containers), "tracking_uri", "run_id",
    "progress": ProgressBoard actor handle or None}."""
    import ray.train

    from ernie_platform.data import DataStats, make_batches

    _quiet_ray_train_reports()
    cfg, t = config["cfg"], config["cfg"]["trainer"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = bool(t["use_gpu"])
    if not use_gpu:
        torch.set_num_threads(int(t["cpus_per_worker"]))
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    model, tokenizer, start = build_stage_model(cfg)
    if rank == 0:
        print(start.message, flush=True)
    vl = is_vl(model)
    ep = int(cfg["moe"]["expert_parallel_size"])
    ep_group = edp_group = placement = None
    saved_shards: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    if ep > 1:
        from ernie_platform.kernels.expert_parallel import expert_parameters, new_expert_parallel_groups, shard_experts
        from ernie_platform.training.placement import ExpertPlacement, initial_tables

        if vl:
            raise ValueError("moe.expert_parallel_size > 1 is implemented for text MoE models only")
        ep_group, edp_group = new_expert_parallel_groups(ep)
        placement = ExpertPlacement(model, cfg["moe"], ep, ctx.get_local_world_size())
        shard_experts(
            model, ep_group, phy2log=initial_tables(placement.num_layers, placement.num_experts, placement.num_slots)
        )
        # DeepSpeed broadcasts rank 0's parameters when the engine is built; the shards differ per EP rank, so they
        # are put back afterwards (replicas in the expert-DP group start equal: same seed / checkpoint).
        saved_shards = [(p, p.detach().clone()) for p in expert_parameters(model)]
    ds_trainer = dict(t, grad_clip=0.0) if ep > 1 else t
    phases = (cfg.get("stage") or {}).get("phases") or []
    if phases and start.source == "scratch":
        # Phases protect what an earlier stage learned (e.g. the language model during the vision warm-up); a model
        # trained from scratch has nothing to protect, so everything trains from the first step.
        if rank == 0:
            print(f"stage phases {[p['name'] for p in phases]} skipped: the model starts from scratch", flush=True)
        phases = []
    engine, optimizer, scheduler = build_engine(
        model,
        ds_trainer,
        world,
        use_gpu,
        param_groups=param_groups(model),
        phases=phases,
        lr_scale=(cfg.get("stage") or {}).get("lr_scale") or {},
    )
    if ep > 1:
        engine.enable_backward_allreduce = False
        with torch.no_grad():
            for p, value in saved_shards:
                p.copy_(value)

    state = {"step": 0, "batches": 0, "run_id": config.get("run_id")}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        read_extra = functools.partial(placement.load, engine.module, optimizer, rank=rank) if placement else None
        state.update(checkpointing.load(engine, checkpoint, rank, read_extra))
        # The LambdaLR factors came back with the checkpoint's trainer config; a rerun may have changed max_steps.
        for factor in scheduler.lr_lambdas:
            factor.trainer_cfg = dict(factor.trainer_cfg, **{k: t[k] for k in factor.trainer_cfg if k in t})
        for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = float(t["lr"]) * factor(scheduler.last_epoch)
        if rank == 0:
            print(f"resuming from checkpoint at step {state['step']} ({checkpoint.path})", flush=True)

    stats = DataStats()
    shard = ray.train.get_dataset_shard("train") if cfg["data"]["source"] != "builtin" else None
    vl_tokens = None
    if vl:
        c = model.cfg
        vl_tokens = {
            "image_token_id": c.image_token_id,
            "image_start_token_id": c.image_start_token_id,
            "image_end_token_id": c.image_end_token_id,
            "patch_size": c.vision.patch_size,
            "spatial_merge_size": c.vision.spatial_merge_size,
        }
    batches = make_batches(
        cfg["data"],
        "vl" if vl else "text",
        tokenizer,
        int(t["micro_batch_size"]),
        int(t["seq_len"]),
        rank,
        world,
        int(t["seed"]),
        shard=shard,
        vl_model_cfg=vl_tokens,
        stats=stats,
    )
    for _ in range(int(state["batches"])):  # data position: replay the deterministic stream up to the checkpoint
        next(batches)

    logger = None
    if rank == 0 and config.get("tracking_uri"):
        from ernie_platform.training.tracking import RankZeroLogger

        logger = RankZeroLogger(config["tracking_uri"], config["run_id"])
        logger.set_tags({"ernie.start": start.message})
    progress = config.get("progress")

    max_steps, accum = int(t["max_steps"]), int(t["grad_accum_steps"])
    windows = phase_windows(phases, max_steps)
    flops_tok = train_flops_per_token(model, int(t["seq_len"]))
    flops_img_tok = vision_flops_per_image_token(model)
    image_token_id = model.cfg.image_token_id if vl else None
    peak = _peak_flops(t) * world
    interval: dict[str, float] = defaultdict(float)
    loads_interval: dict[str, torch.Tensor] = {}
    loads_total: dict[str, torch.Tensor] = {}
    t_interval = time.time()
    t_start, step_start = time.time(), int(state["step"])
    metrics: dict[str, float] = {}
    last_phase = None

    engine.train()
    step = int(state["step"])
    while step < max_steps:
        phase, _ = phase_at(windows, step)
        if phase != last_phase and rank == 0 and len(windows) > 1:
            print(f"step {step + 1}: phase {phase}", flush=True)
        last_phase = phase
        checkpointing.maybe_inject_failure(t, run_dir(cfg), step, rank)
        # The learning rates this step trains with (the scheduler already points at them).
        lrs_used = {g.get("name", "all"): float(g["lr"]) for g in scheduler.optimizer.param_groups}
        for _ in range(accum):
            batch = _to_device(next(batches), device)
            state["batches"] = int(state["batches"]) + 1
            out = engine(**batch)
            engine.backward(out.loss)
            if engine.is_gradient_accumulation_boundary() and ep > 1:
                from ernie_platform.kernels.expert_parallel import allreduce_gradients

                allreduce_gradients(engine.module, None, edp_group)
                interval["grad_norm"] += _clip_expert_parallel(engine.module, float(t["grad_clip"]), ep_group)
            engine.step()
            n_tok = (
                int(batch["attention_mask"].sum()) if batch["attention_mask"].dim() == 2 else batch["input_ids"].numel()
            )
            n_img = int((batch["input_ids"] == image_token_id).sum()) if vl else 0
            interval["tokens"] += n_tok
            interval["image_tokens"] += n_img
            interval["loss"] += float(out.loss.detach()) / accum
            interval["lm_loss"] += float(out.lm_loss.detach()) / accum
            for k, v in out.router_losses.items():
                interval[f"router/{k}"] += float(v.detach()) / accum
            micro_loads = _expert_loads(engine.module)
            for k, v in micro_loads.items():
                loads_interval[k] = loads_interval.get(k, 0) + v.cpu()
            if placement is not None:
                placement.record(micro_loads)
        if ep == 1:
            norm = engine.get_global_grad_norm()
            if norm is not None:
                interval["grad_norm"] += float(norm)
        if cfg["moe"]["bias_update_rate"] and not vl:
            sync_expert_load(engine.module)
            engine.module.update_expert_bias()
        step += 1
        interval["steps"] += 1
        state["step"] = step
        if placement is not None and placement.due(step, max_steps):
            moved = placement.rebalance(engine.module, optimizer)
            interval.update(moved)  # the latest plan of the logging interval
            if rank == 0:
                print(
                    f"step {step}: experts re-placed ({moved['balance/slots_moved']:.0f} slots moved), EP device "
                    f"load max/mean {moved['balance/device_imbalance_before']:.3f} -> "
                    f"{moved['balance/device_imbalance_after']:.3f} on the last {placement.interval} steps' loads",
                    flush=True,
                )

        last = step == max_steps
        if step % int(t["log_every"]) == 0 or last:
            elapsed = time.time() - t_interval
            n = interval.pop("steps")
            tokens, img_tokens = interval.pop("tokens"), interval.pop("image_tokens")
            # balance/* happen once per plan: their value in the interval, not a per-step mean.
            sums = _allreduce_mean({k: v if k.startswith("balance/") else v / n for k, v in interval.items()}, world)
            totals = _allreduce_mean({"tokens": tokens, "image_tokens": img_tokens}, world)
            tok_s = totals["tokens"] * world / max(elapsed, 1e-9)
            flops = (totals["tokens"] * flops_tok + totals["image_tokens"] * flops_img_tok) * world / max(elapsed, 1e-9)
            metrics = dict(sums)
            metrics.update({"tokens_per_s": tok_s, "mfu": flops / peak, "step_time_s": elapsed / n, "epoch_step": step})
            for name, lr in lrs_used.items():
                metrics[f"lr/{name}"] = lr
            metrics["lr"] = max(lrs_used.values())
            loads = _allreduce_sum_tensors(loads_interval, world)
            ratios = []
            for k, load in loads.items():
                loads_total[k] = loads_total.get(k, 0) + load
                if load.sum() > 0:
                    ratio = float(load.max() / load.mean())
                    metrics[f"expert_load/imbalance/{k}"] = ratio
                    ratios.append(ratio)
            if ratios:
                metrics["expert_load/imbalance_mean"] = sum(ratios) / len(ratios)
            if placement is not None and loads:
                # How evenly the interval's routed pairs fell on the EP group's devices under the placement now held.
                metrics["expert_load/device_imbalance_mean"] = placement.device_imbalance(
                    placement.stack(loads), placement.tables(engine.module)
                )
            metrics.update(_data_metrics(stats, world))
            if rank == 0:
                if logger is not None:
                    logger.log(metrics, step)
                if progress is not None:
                    progress.update.remote(
                        {
                            "step": step,
                            "max_steps": max_steps,
                            "loss": metrics["lm_loss"],
                            "tokens_per_s": tok_s,
                            "eta_s": _eta_s(step, max_steps, step_start, t_start),
                            "phase": phase,
                        }
                    )
            interval, loads_interval, t_interval = defaultdict(float), {}, time.time()

        eval_every = int(t.get("eval_every") or 0)
        if (last or (eval_every and step % eval_every == 0)) and ep == 1:
            ev = {}
            if rank == 0:
                if vl:
                    ev = _eval_vl(engine.module, cfg, tokenizer)
                else:
                    ev = _eval_text(engine.module, cfg, tokenizer, device)
                if logger is not None and ev:
                    logger.log(ev, step)
                if ev:
                    print("eval " + " ".join(f"{k}={v:.4f}" for k, v in sorted(ev.items())), flush=True)
            metrics.update(ev)

        every = int(t["checkpoint_every"])
        if last or (every and step % every == 0):
            if rank == 0 and logger is not None and loads_total:
                logger.log_dict(
                    {"step": step, "loads": {k: v.tolist() for k, v in loads_total.items()}},
                    f"expert_load/step_{step:07d}.json",
                )
            report = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            report["step"] = step
            write_extra = functools.partial(placement.save, engine.module, optimizer, rank=rank) if placement else None
            checkpointing.save(engine, dict(state), rank, report, write_extra)

    if max_steps <= step_start and rank == 0:
        print(f"nothing to train: the checkpoint is at step {step_start} >= trainer.max_steps={max_steps}", flush=True)
    # After the last checkpoint: gathering expert shards replaces the engine's parameters, and a crash here resumes
    # at step == max_steps, which lands straight back on the export.
    target = _export(engine, cfg, tokenizer, rank, ep)
    if rank == 0 and logger is not None:
        summary = {k: f"{v:.2f}" for k, v in model_summary(engine.module).items()}
        logger.set_tags({"ernie.export": target, **summary})
        logger.close()


__all__ = ["export_dir", "run_dir", "train_loop_per_worker"]
