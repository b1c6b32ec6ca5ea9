"""LoRA (Hu et al. 2021) for the platform's plain-torch models, with PEFT-compatible adapter files.

`apply_lora` wraps the targeted `nn.Linear` modules in `LoRALinear`, which adds a trainable low-rank update
x·Aᵀ·Bᵀ·(alpha/r) to the frozen base layer. Module names follow transformers' Ernie4_5 naming, so the adapter keys
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) are the ones PEFT writes for the transformers
model. Targets: attention `q_proj, k_proj, v_proj, o_proj` and the dense/shared-expert MLP `gate_proj, up_proj,
down_proj`. The routed experts of an MoE layer are stacked Parameters (`w13_E2FD`, `w2_EDF`), not `nn.Linear`, so
LoRA never adapts them (nor the router, whose `gate` is not an `nn.Linear` either).

While adapters are applied the wrapped layers' base weights live under `<module>.base.weight`; `merge_lora` restores
the original names, so merge before `save_pretrained` (or save the adapters alone with `save_adapters`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
# PEFT keys every adapter weight as `base_model.model.<module name>.lora_{A,B}.weight` (adapter name stripped).
PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def validate(self) -> LoRAConfig:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRAConfig.r must be an integer >= 1, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRAConfig.alpha must be a finite number > 0, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"LoRAConfig.target_modules must be a non-empty list of module names, got {targets!r}")
        return self

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoRALinear(nn.Module):
    """A frozen `base` nn.Linear plus a low-rank update: base(x) + lora_B(lora_A(dropout(x))) · alpha / r.

    lora_B starts at zero, so a freshly wrapped layer computes exactly what the base layer did. `enabled=False`
    turns the update off (the reference policy of DPO/GRPO is the base model with adapters disabled).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        self.enabled = True
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # PEFT's default init: A like nn.Linear's default, B zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # Read-only views so code that inspects `layer.weight` / `layer.in_features` keeps working on a wrapped layer.
    @property
    def weight(self) -> nn.Parameter:
        return self.base.weight

    @property
    def bias(self) -> Optional[nn.Parameter]:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """The update B·A·scaling [out, in] that merging adds to the base weight (in fp32, or fp64 for fp64)."""
        dtype = torch.promote_types(self.lora_B.weight.dtype, torch.float32)
        return (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, enabled={self.enabled}"


# ---- applying, inspecting, merging -----------------------------------------------------------------------------------
def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every nn.Linear whose name matches `cfg.target_modules` in a LoRALinear, in place, and freeze every
    other parameter. Returns the wrapped module names.

    A target matches a module name when it equals the name's last component(s): "q_proj" and "self_attn.q_proj"
    both match `model.layers.0.self_attn.q_proj`. A tied lm_head is only wrapped when targeted, and keeps sharing
    its weight with the embedding (see `merge_lora` for the consequence).
    """
    cfg.validate()
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; merge_lora() them first or load into it directly")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name}
    wrapped = [name for name in linears if _matches(name, cfg.target_modules)]
    if not wrapped:
        leaf_names = sorted({name.rpartition(".")[2] for name in linears})
        raise ValueError(
            f"LoRA target_modules {cfg.target_modules} match no nn.Linear of {type(model).__name__}; "
            f"its nn.Linear leaf names are {leaf_names}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in wrapped:
        _set_submodule(model, name, LoRALinear(linears[name], cfg.r, cfg.alpha, cfg.dropout))
    return wrapped


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (lora_A and lora_B weights), in module order: what the optimizer should train."""
    return [p for m in _lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its base model (adapters off) inside the block; each adapter's previous state is restored
    on exit, also when the block raises."""
    modules = list(_lora_modules(model).values())
    if not modules:
        # Silently yielding would make a "reference" model that is the policy itself.
        raise ValueError("lora_disabled: the model has no LoRA adapters")
    previous = [m.enabled for m in modules]
    try:
        for m in modules:
            m.enabled = False
        yield model
    finally:
        for m, state in zip(modules, previous):
            m.enabled = state


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, n in seen.items() if n > 1}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += B·A·scaling), put the base nn.Linear back under the same name
    and make every parameter trainable again, in place. The state_dict keys are then those of a model that never
    had LoRA.

    Raises ValueError for an adapted layer whose weight is shared (a tied lm_head): merging would change the
    embedding too.
    """
    modules = _lora_modules(model)
    if not modules:
        raise ValueError("merge_lora: the model has no LoRA adapters")
    shared = _shared_parameter_ids(model)
    tied = [name for name, m in modules.items() if id(m.base.weight) in shared]
    if tied:
        raise ValueError(
            f"cannot merge LoRA into {tied}: their weight is shared with another module (tied embeddings); "
            "untie the weights first or keep the adapters separate"
        )
    with torch.no_grad():
        for name, m in modules.items():
            w = m.base.weight
            delta = m.delta_weight()
            w.copy_((w.to(delta.dtype) + delta).to(w.dtype))
            _set_submodule(model, name, m.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ---- PEFT-format adapter files ---------------------------------------------------------------------------------------
def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights keyed as PEFT saves them: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`."""
    out = {}
    for name, m in _lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def _check_config_matches(model: nn.Module, cfg: LoRAConfig) -> None:
    for name, m in _lora_modules(model).items():
        if m.r != cfg.r or m.scaling != cfg.scaling:
            raise ValueError(
                f"LoRA config (r={cfg.r}, alpha={cfg.alpha}) does not match the adapter on {name} "
                f"(r={m.r}, alpha={m.alpha})"
            )


def _peft_config(cfg: LoRAConfig, base_model_path: Optional[str]) -> dict[str, Any]:
    # Only keys PEFT's LoraConfig knows: older PEFT versions reject unknown ones.
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }


def save_adapters(
    model: nn.Module, directory: Union[str, Path], cfg: LoRAConfig, base_model_path: Optional[str] = None
) -> Path:
    """Write `adapter_model.safetensors` and `adapter_config.json` (PEFT's layout) into `directory`."""
    from safetensors.torch import save_file

    cfg.validate()
    state = lora_state_dict(model)
    if not state:
        raise ValueError("save_adapters: the model has no LoRA adapters")
    _check_config_matches(model, cfg)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.cpu().contiguous() for k, v in state.items()}, str(directory / ADAPTER_WEIGHTS_NAME), {"format": "pt"}
    )
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(_peft_config(cfg, base_model_path), indent=2) + "\n")
    return directory


def read_adapter_config(directory: Union[str, Path]) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter directory (only plain LoRA with a list of target module names)."""
    path = Path(directory) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG_NAME} in {directory}")
    raw = json.loads(path.read_text())
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type must be 'LORA', got {raw.get('peft_type')!r}")
    if raw.get("bias", "none") != "none":
        raise ValueError(f"{path}: only bias 'none' is supported, got {raw.get('bias')!r}")
    targets = raw.get("target_modules")
    if not isinstance(targets, list):
        # PEFT treats a string as a regex (or "all-linear"); we only match module names.
        raise ValueError(f"{path}: target_modules must be a list of module names, got {targets!r}")
    return LoRAConfig(
        r=raw["r"], alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0.0)), target_modules=targets
    ).validate()


def load_adapters(model: nn.Module, directory: Union[str, Path]) -> LoRAConfig:
    """Load a PEFT LoRA adapter directory into `model`, applying LoRA from its config first when the model has
    none. Every adapter weight must be present with its exact shape; returns the adapter's LoRAConfig."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(directory)
    weights_path = Path(directory) / ADAPTER_WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS_NAME} in {directory}")
    if has_lora(model):
        _check_config_matches(model, cfg)
    else:
        apply_lora(model, cfg)
    loaded = load_file(str(weights_path))
    expected = lora_state_dict(model)
    missing = sorted(expected.keys() - loaded.keys())
    unexpected = sorted(loaded.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"adapter {weights_path} does not fit the model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    for key, target in expected.items():
        if loaded[key].shape != target.shape:
            raise ValueError(
                f"adapter {weights_path}: {key} has shape {tuple(loaded[key].shape)}, "
                f"the model expects {tuple(target.shape)}"
            )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(loaded[key])
    return cfg
