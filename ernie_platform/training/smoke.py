"""Single-process training smoke run of the selected model on the built-in corpus.

This is what `python -m workloads.pretrain +stage=…` runs until the staged Ray Train + DeepSpeed job lands: it
builds the model from the composed config (or loads `model.path`), trains `trainer.max_steps` steps with AdamW,
warm-up + cosine learning rate, gradient clipping and the router losses, then exports the result in the
transformers layout to `run.storage_path/run.name/export/`.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ernie_platform.configs import to_model_args
from ernie_platform.data import packed_token_batches
from ernie_platform.models import (
    ErnieForCausalLM,
    MoEConfig,
    count_params,
    load_pretrained,
    load_tokenizer,
    save_pretrained,
)

log = logging.getLogger(__name__)


def lr_at(step: int, max_steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_ratio` at `max_steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def run_smoke(cfg: DictConfig) -> dict[str, Any]:
    t = cfg.trainer
    torch.manual_seed(t.seed)
    moe_cfg = MoEConfig(**OmegaConf.to_container(cfg.moe, resolve=True))
    if cfg.model.path:
        model = load_pretrained(cfg.model.path, dtype=torch.float32, moe_cfg=moe_cfg)
        tokenizer = load_tokenizer(cfg.model.path)
        log.info("loaded %s", cfg.model.path)
    else:
        model = ErnieForCausalLM(to_model_args(cfg.model), moe_cfg)
        tokenizer = load_tokenizer(None)
        log.info("no model.path: training %s from scratch with the built-in byte-level tokenizer", cfg.model.name)
    if len(tokenizer) > model.args.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but model.vocab_size={model.args.vocab_size}")
    counts = count_params(model.args)
    log.info(
        "stage=%s model=%s params total=%.2fM active=%.2fM; staged Ray Train/DeepSpeed pretraining lands with issue 5",
        cfg.stage,
        cfg.model.name,
        counts.total / 1e6,
        counts.active / 1e6,
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.95))
    batches = packed_token_batches(tokenizer, t.micro_batch_size, t.seq_len, seed=t.seed)
    losses: list[float] = []
    start = time.time()
    for step in range(t.max_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, t.max_steps, t.lr, t.warmup_steps, t.min_lr_ratio)
        opt.zero_grad(set_to_none=True)
        lm = 0.0
        for _ in range(t.grad_accum_steps):
            ids = next(batches)
            out = model(ids, labels=ids)
            (out.loss / t.grad_accum_steps).backward()
            lm += out.lm_loss.item() / t.grad_accum_steps
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        if moe_cfg.bias_update_rate:
            model.update_expert_bias()
        losses.append(lm)
        if step % t.log_every == 0 or step == t.max_steps - 1:
            extra = ""
            if out.router_losses:
                extra = f" load_balance={out.router_losses['load_balance'].item():.3f}"
            log.info(
                "step %d/%d lm_loss=%.4f grad_norm=%.3f lr=%.2e%s",
                step + 1,
                t.max_steps,
                lm,
                float(grad_norm),
                opt.param_groups[0]["lr"],
                extra,
            )
    elapsed = time.time() - start
    export = Path(cfg.run.storage_path) / cfg.run.name / "export"
    save_pretrained(model, export, tokenizer=tokenizer)
    tokens = t.max_steps * t.grad_accum_steps * t.micro_batch_size * t.seq_len
    log.info(
        "done: %d steps in %.1fs (%.0f tokens/s); first loss %.4f, last loss %.4f; export at %s",
        t.max_steps,
        elapsed,
        tokens / max(elapsed, 1e-9),
        losses[0],
        losses[-1],
        export,
    )
    return {"losses": losses, "export": str(export), "seconds": elapsed}
