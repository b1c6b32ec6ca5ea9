"""The model a pretraining stage starts from, its parameter groups and its FLOP model.

ERNIE 4.5's staged recipe: `text` (text-only MoE, short context) → `long` (same model, longer sequences, RoPE base
raised) → `mm` (the text model grown into ERNIE-4.5-VL: ViT, resampler and vision experts added, then trained on
image–text data). A stage starts from, in order of preference:

1. `model.path` (an explicit checkpoint), else
2. `stage.init_from` (the previous stage's export) when that directory holds a checkpoint, else
3. a fresh model built from the `model` config — logged as one clear line, so `+stage=mm` works on a fresh machine.

A text checkpoint entering a VL stage is grown with `grow_text_to_vl` (the `model` node gives the vision side and
must agree with the checkpoint's text architecture); `stage.rope_theta` then sets the RoPE base of whatever model
was built. Every rank calls this with the same config and seed, so the ranks start identical (DeepSpeed also
broadcasts rank 0's weights when the engine is built).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from ernie_platform.configs.schema import to_model_args, to_vl_config
from ernie_platform.models import ErnieForCausalLM, MoEConfig, load_pretrained, load_tokenizer
from ernie_platform.models.ernie import RotaryEmbedding
from ernie_platform.models.flops import count_params, flops_per_token
from ernie_platform.models.vl.flops import count_vision_params, count_vl_params
from ernie_platform.models.vl.model import ErnieVLForConditionalGeneration
from ernie_platform.models.vl.text import MRotaryEmbedding

log = logging.getLogger(__name__)

AnyModel = Union[ErnieForCausalLM, ErnieVLForConditionalGeneration]


@dataclasses.dataclass
class StageStart:
    """How a stage's model came to be (logged, and recorded in the MLflow run)."""

    source: str  # "scratch" | "checkpoint" | "grown"
    path: str | None
    message: str
    new_parameters: int = 0


def _has_checkpoint(path: str | None) -> bool:
    return bool(path) and (Path(path) / "config.json").is_file()


def is_vl(model: nn.Module) -> bool:
    return isinstance(model, ErnieVLForConditionalGeneration)


def set_rope_theta(model: AnyModel, theta: float) -> None:
    """Train with RoPE base `theta` (the long-context stage raises it); the export records the new value."""
    if is_vl(model):
        model.cfg.text = dataclasses.replace(model.cfg.text, rope_theta=float(theta))
        lm = model.model.language_model
        old = lm.rotary_emb
        device = next(old.buffers()).device
        lm.rotary_emb = MRotaryEmbedding(
            model.cfg.text.attention_args().resolved_head_dim, float(theta), model.cfg.text.mrope_section
        ).to(device)
    else:
        model.args = dataclasses.replace(model.args, rope_theta=float(theta))
        device = model.model.rotary_emb.inv_freq.device
        model.model.rotary_emb = RotaryEmbedding(model.args.resolved_head_dim, float(theta)).to(device)


def start_plan(cfg: dict[str, Any]) -> str:
    """One line saying where the stage starts (the driver prints it before any worker loads anything)."""
    model_cfg, stage = cfg["model"], cfg.get("stage") or {}
    name = stage.get("name") or "pretrain"
    path = model_cfg.get("path") or (stage.get("init_from") if _has_checkpoint(stage.get("init_from")) else None)
    if path:
        return f"stage {name}: starting from {path}"
    where = stage.get("init_from")
    why = f"no previous-stage export at {where}" if where else "no stage.init_from / model.path"
    return f"stage {name}: {why}; training {model_cfg.get('name')} from scratch"


def build_stage_model(cfg: dict[str, Any]) -> tuple[AnyModel, Any, StageStart]:
    """(fp32 model on CPU, tokenizer, how it started) for the resolved config `cfg` (plain containers)."""
    from ernie_platform.models.vl.grow import grow_text_to_vl

    model_cfg, stage = cfg["model"], cfg.get("stage") or {}
    name = stage.get("name") or "pretrain"
    moe_cfg = MoEConfig(**cfg["moe"])
    want_vl = model_cfg.get("vision") is not None
    theta = stage.get("rope_theta")
    torch.manual_seed(int(cfg["trainer"]["seed"]))

    start_path = model_cfg.get("path") or (stage.get("init_from") if _has_checkpoint(stage.get("init_from")) else None)
    if start_path:
        if not _has_checkpoint(start_path):
            raise FileNotFoundError(f"model.path={start_path}: no config.json there (not a checkpoint directory)")
        loaded = load_pretrained(start_path, dtype=torch.float32, moe_cfg=moe_cfg)
        tokenizer = load_tokenizer(start_path)
        if want_vl and not is_vl(loaded):
            vl_cfg = to_vl_config(model_cfg)
            if theta is not None:
                set_rope_theta(loaded, theta)
                vl_cfg.text = dataclasses.replace(vl_cfg.text, rope_theta=float(theta))
            model, new = grow_text_to_vl(loaded, vl_cfg)
            model.moe_cfg = moe_cfg
            n_new = sum(p.numel() for n, p in model.named_parameters() if n in set(new))
            start = StageStart(
                "grown",
                start_path,
                f"stage {name}: starting from {start_path}, grown into the VL model {model_cfg.get('name')} "
                f"({n_new / 1e6:.2f}M new parameters: vision tower, resampler, vision experts)",
                n_new,
            )
        elif not want_vl and is_vl(loaded):
            raise ValueError(
                f"stage {name}: {start_path} is a VL checkpoint but model {model_cfg.get('name')} is text-only"
            )
        else:
            model = loaded
            start = StageStart("checkpoint", start_path, f"stage {name}: starting from {start_path}")
    else:
        if want_vl:
            model = ErnieVLForConditionalGeneration(to_vl_config(model_cfg), moe_cfg=moe_cfg)
        else:
            model = ErnieForCausalLM(to_model_args(model_cfg), moe_cfg)
        tokenizer = load_tokenizer(None)
        start = StageStart("scratch", None, start_plan(cfg))
    if theta is not None:
        set_rope_theta(model, theta)
    vocab = model.cfg.text.vocab_size if is_vl(model) else model.args.vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}")
    return model.float(), tokenizer, start


def param_groups(model: AnyModel) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by group (`schedule.PARAM_GROUPS`): the VL model's vision tower, resampler and vision
    experts (their routers included), and everything else as `text`. A text model is all `text`."""
    groups: dict[str, list[nn.Parameter]] = {"text": [], "vision": [], "resampler": [], "vision_experts": []}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if n.startswith("model.vision_tower."):
            groups["vision"].append(p)
        elif n.startswith("model.resampler_model."):
            groups["resampler"].append(p)
        elif ".vision_moe." in n:
            groups["vision_experts"].append(p)
        else:
            groups["text"].append(p)
    return {k: v for k, v in groups.items() if v}


def model_summary(model: AnyModel) -> dict[str, float]:
    """Total / active parameter counts (millions) of the architecture."""
    counts = count_vl_params(model.cfg) if is_vl(model) else count_params(model.args)
    return {"params_total_M": counts.total / 1e6, "params_active_M": counts.active / 1e6}


def train_flops_per_token(model: AnyModel, seq_len: int) -> float:
    """Training FLOPs per token (3 × forward; forward = 2 × active matmul weights + attention), the MFU numerator.

    VL model: every token is costed as a text token through the LM (image tokens really take the narrower vision
    experts, so this slightly overestimates), plus the vision tower: 6 × ViT parameters per patch, and
    spatial_merge_size² patches per image token — a per-token average assuming every token were an image token
    would be wrong, so the loop adds `vision_flops_per_image_token` only for image tokens."""
    if not is_vl(model):
        return flops_per_token(model.args, seq_len)
    a = model.cfg.text
    counts = count_vl_params(model.cfg)
    lm_active = counts.active_non_embedding - count_vision_params(model.cfg) + a.vocab_size * a.hidden_size
    head_dim = a.attention_args().resolved_head_dim
    attn = 2 * 2 * a.num_hidden_layers * a.num_attention_heads * head_dim * seq_len
    return float(3 * (2 * lm_active + attn))


def vision_flops_per_image_token(model: AnyModel) -> float:
    if not is_vl(model):
        return 0.0
    merge = model.cfg.vision.spatial_merge_size
    return float(6 * count_vision_params(model.cfg) * merge * merge)


__all__ = [
    "StageStart",
    "build_stage_model",
    "is_vl",
    "model_summary",
    "param_groups",
    "set_rope_theta",
    "start_plan",
    "train_flops_per_token",
    "vision_flops_per_image_token",
]
