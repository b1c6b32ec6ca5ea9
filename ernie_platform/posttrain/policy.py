"""The policy being post-trained: where it starts, its LoRA adapters, its frozen reference and its weights for sync.

Start (`start_of`): `model.path`, else the newest text-model export under `run.storage_path` (a pretraining or
earlier post-training run), else the embedded demo model (random weights) with a warning — the order the issue and
`workloads.serve` use. The reference for DPO / the KL term is the starting model itself: a frozen copy, or — with
LoRA — the same module with its adapters switched off, which costs no memory.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ernie_platform.models.config import TEXT_MODEL_TYPES, VL_MODEL_TYPES
from ernie_platform.posttrain.lora import LoRAConfig, LoRALinear, apply_lora, has_lora, lora_disabled
from ernie_platform.training.preflight import check_checkpoint_dir


@dataclass
class PolicyStart:
    path: Optional[str]  # checkpoint directory, or None for the demo model
    message: str  # one log line saying where the run starts


def newest_export(storage_path: str, exclude: Optional[str] = None) -> Optional[str]:
    """The most recently written `<run>/export/` under `storage_path` that holds a text model (VL exports are not
    post-trained here); `exclude`: this run's own export, which must not be its own starting point."""
    root = Path(storage_path)
    if "://" in storage_path or not root.is_dir():
        return None
    found = []
    for config in root.glob("*/export/config.json"):
        if exclude and config.parent.resolve() == Path(exclude).resolve():
            continue
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError):
            continue
        if model_type in TEXT_MODEL_TYPES:
            found.append((config.stat().st_mtime, str(config.parent)))
    return max(found)[1] if found else None


def start_of(cfg: dict[str, Any], own_export: str) -> PolicyStart:
    path = cfg["model"].get("path")
    if path:
        check_checkpoint_dir("model.path", path)
        return PolicyStart(path, f"starting from model.path={path}")
    newest = newest_export(cfg["run"]["storage_path"], exclude=own_export)
    if newest:
        return PolicyStart(newest, f"no model.path: starting from the newest local export {newest}")
    return PolicyStart(
        None,
        f"no model.path and no text-model export under {cfg['run']['storage_path']}: starting from the demo model "
        f"{cfg['model'].get('name')} with RANDOM weights (post-training it learns the task from scratch)",
    )


@dataclass
class ChatTemplateChoice:
    source: str  # "checkpoint" (the tokenizer's own), "builtin" (the built-in tokenizer's), "ernie45" (fallback)
    message: str  # one log line saying which template the run uses and why


def ensure_chat_template(tokenizer: Any, start: PolicyStart) -> ChatTemplateChoice:
    """Give `tokenizer` (the one loaded for `start`) a chat template, or fail naming the checkpoint.

    Post-training renders every example with `tokenizer.apply_chat_template`; many base checkpoints ship a tokenizer
    without one, on which transformers raises only inside the Ray Train workers. Such a checkpoint of an ERNIE 4.5
    text model (`model_type` ernie4_5 / ernie4_5_moe, the only ones post-training takes) gets ERNIE 4.5's template —
    the one of the built-in tokenizer, which serving also falls back to (`serving.chat`); any other model type is
    refused, since its conversation format cannot be guessed. The driver calls this before Ray starts
    (`check_chat_template`), the workers again on the tokenizer they load, with the same outcome."""
    from ernie_platform.inference.loading import has_tokenizer
    from ernie_platform.models.tokenizer import CHAT_TEMPLATE

    if getattr(tokenizer, "chat_template", None):
        if start.path is None or not has_tokenizer(start.path):  # checkpoint_tokenizer fell back to the built-in one
            return ChatTemplateChoice("builtin", "the built-in tokenizer's chat template (ERNIE 4.5's)")
        return ChatTemplateChoice("checkpoint", f"the chat template of the tokenizer in {start.path}")
    model_type = _model_type(start.path)
    if model_type in TEXT_MODEL_TYPES:
        tokenizer.chat_template = CHAT_TEMPLATE
        return ChatTemplateChoice(
            "ernie45",
            f"the tokenizer in {start.path} has no chat template (none in tokenizer_config.json, no "
            f"chat_template.jinja): using ERNIE 4.5's (ernie_platform.models.tokenizer.CHAT_TEMPLATE) for this "
            f"{model_type} checkpoint",
        )
    raise ValueError(
        f"model.path={start.path}: its tokenizer has no chat template, which post-training needs to render the "
        f"conversations, and model_type={model_type!r} is not an ERNIE 4.5 text model ({', '.join(TEXT_MODEL_TYPES)}),"
        f" so ERNIE 4.5's template is not assumed; add a `chat_template` to {start.path}/tokenizer_config.json (or "
        "a chat_template.jinja file there)"
    )


def _model_type(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def check_chat_template(start: PolicyStart) -> ChatTemplateChoice:
    """The driver's check, before Ray starts: the chat template the workers' tokenizer will have (or the error they
    would hit, at once). Also refuses a VL checkpoint, which the workers would only find after loading it."""
    from ernie_platform.inference.loading import checkpoint_tokenizer

    if _model_type(start.path) in VL_MODEL_TYPES:
        raise ValueError(f"{start.path}: a VL checkpoint; post-training supports text models (ernie4_5, ernie4_5_moe)")
    return ensure_chat_template(checkpoint_tokenizer(start.path), start)


def load_policy(cfg: dict[str, Any], start: PolicyStart) -> tuple[nn.Module, Any]:
    """(fp32 model on CPU in train mode, tokenizer); LoRA applied when `algo.finetune=lora`."""
    from ernie_platform.configs.schema import to_model_args
    from ernie_platform.inference.loading import checkpoint_tokenizer
    from ernie_platform.models import ErnieForCausalLM, MoEConfig, load_pretrained

    moe_cfg = MoEConfig(**cfg["moe"])
    torch.manual_seed(int(cfg["trainer"]["seed"]))
    if start.path:
        model = load_pretrained(start.path, dtype=torch.float32, moe_cfg=moe_cfg)
    else:
        model = ErnieForCausalLM(to_model_args(cfg["model"]), moe_cfg)
    tokenizer = checkpoint_tokenizer(start.path)
    ensure_chat_template(tokenizer, start)
    if getattr(model, "cfg", None) is not None and hasattr(model.cfg, "vision"):
        raise ValueError(f"{start.path}: a VL checkpoint; post-training supports text models (ernie4_5, ernie4_5_moe)")
    if len(tokenizer) > model.args.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.args.vocab_size}")
    if cfg["algo"]["finetune"] == "lora":
        apply_lora(model, lora_config(cfg))
    return model.float().train(), tokenizer


def lora_config(cfg: dict[str, Any]) -> LoRAConfig:
    """The validated adapter config of `algo.lora` (a resolved config: plain containers)."""
    lora = cfg["algo"]["lora"]
    return LoRAConfig(
        r=int(lora["r"]),
        alpha=float(lora["alpha"]),
        dropout=float(lora["dropout"]),
        target_modules=list(lora["target_modules"]),
    ).validate()


def frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@contextlib.contextmanager
def reference_of(policy: nn.Module, ref: Optional[nn.Module]) -> Iterator[nn.Module]:
    """The reference model for a no-grad forward: `ref` (a frozen copy), or the policy with its adapters off."""
    if ref is not None:
        yield ref
        return
    was = policy.training
    policy.eval()  # no dropout in the reference
    try:
        with lora_disabled(policy):
            yield policy
    finally:
        policy.train(was)


def needs_reference(cfg: dict[str, Any]) -> bool:
    algo = cfg["algo"]
    return algo["name"] == "dpo" or algo["name"] == "upo" or float(algo["kl_coef"]) > 0


def build_reference(cfg: dict[str, Any], policy: nn.Module) -> Optional[nn.Module]:
    """A frozen copy of the starting policy when one is needed and LoRA cannot provide it for free."""
    if not needs_reference(cfg) or has_lora(policy):
        return None
    return frozen_copy(policy)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The policy's weights in the plain model's layout (LoRA deltas folded in), on CPU: what rollout engines load.
    Every tensor is a copy with storage of its own: DeepSpeed's ZeRO-1/2 make the parameters views into one flat
    buffer per group, and pickling a view (ray.put) writes its whole storage, once per tensor (a 72 MB model became a
    5 GB object, spilled to disk every RL step)."""
    out: dict[str, torch.Tensor] = {}
    lora = {name: mod for name, mod in model.named_modules() if isinstance(mod, LoRALinear)}
    for name, tensor in model.state_dict().items():
        owner, _, rest = name.rpartition(".base.")
        if owner not in lora:
            if name.rsplit(".", 2)[0] not in lora:  # <owner>.lora_A/B.weight are folded into <owner>.weight
                out[name] = tensor.detach().cpu().clone()
        elif rest == "weight":
            out[f"{owner}.weight"] = (tensor + lora[owner].delta_weight().to(tensor.dtype)).detach().cpu()
        else:
            out[f"{owner}.{rest}"] = tensor.detach().cpu().clone()
    return out


def environment_threads(cpus: float) -> None:
    """One intra-op thread per CPU a Ray actor or worker was given (torch would otherwise use every core)."""
    n = max(1, int(cpus))
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


__all__ = [
    "ChatTemplateChoice",
    "PolicyStart",
    "build_reference",
    "check_chat_template",
    "ensure_chat_template",
    "environment_threads",
    "frozen_copy",
    "load_policy",
    "merged_state_dict",
    "needs_reference",
    "newest_export",
    "reference_of",
    "start_of",
]
