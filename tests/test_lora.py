"""LoRA on the tiny ERNIE MoE: freezing, exact zero-init, merging, disabling and PEFT-format adapter files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_MOE_ARGS
from safetensors.torch import load_file, save_file
from torch import nn

from ernie_platform.models import ErnieForCausalLM, ErnieModelArgs
from ernie_platform.posttrain.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    has_lora,
    load_adapters,
    lora_disabled,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    save_adapters,
)

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ATTN_NAMES = [f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ATTN]


def _model(seed: int = 0) -> ErnieForCausalLM:
    torch.manual_seed(seed)
    return ErnieForCausalLM(ErnieModelArgs(**TINY_MOE_ARGS)).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, TINY_MOE_ARGS["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))


def _train(model: nn.Module, steps: int, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW(lora_parameters(model), lr=lr)
    target = torch.randn(2, 7, TINY_MOE_ARGS["vocab_size"], generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        opt.zero_grad()
        (model(_ids()).logits * target.to(next(model.parameters()).dtype)).mean().backward()
        opt.step()


@torch.no_grad()
def _logits(model: nn.Module) -> torch.Tensor:
    return model(_ids()).logits


def test_lora_linear_by_hand() -> None:
    base = nn.Linear(2, 1)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0]]))
        base.bias.fill_(0.5)
    layer = LoRALinear(base, r=1, alpha=2.0)
    assert layer.lora_B.weight.tolist() == [[0.0]] and layer.scaling == 2.0
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.tensor([[1.0, 1.0]]))
        layer.lora_B.weight.fill_(3.0)
    x = torch.tensor([[1.0, 2.0]])
    # base: 1 + 4 + 0.5 = 5.5; update: 3 · (1 + 2) · 2 = 18.
    assert layer(x).tolist() == [[23.5]]
    assert layer.delta_weight().tolist() == [[6.0, 6.0]]
    layer.enabled = False
    assert layer(x).tolist() == [[5.5]]
    assert layer.weight is base.weight and layer.in_features == 2 and layer.out_features == 1


def test_apply_lora_wraps_targets_and_freezes_the_rest() -> None:
    model = _model()
    names = apply_lora(model, LoRAConfig())
    assert names == ATTN_NAMES
    assert has_lora(model) and isinstance(model.model.layers[2].self_attn.v_proj, LoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in ATTN_NAMES for ab in "AB"}
    assert len(lora_parameters(model)) == 24
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.shape == (8, 64)
    assert model.model.layers[0].self_attn.q_proj.lora_B.weight.shape == (64, 8)
    # The untargeted lm_head stays a plain Linear tied to the embedding; routed experts are never wrapped.
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.model.layers[1].mlp.w13_E2FD.requires_grad


def test_dotted_suffix_targets() -> None:
    model = _model()
    assert apply_lora(model, LoRAConfig(target_modules=["self_attn.q_proj", "mlp.gate_proj"])) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.gate_proj",  # the dense MLP; shared experts are `mlp.shared_experts.gate_proj`
        "model.layers.1.self_attn.q_proj",
        "model.layers.2.self_attn.q_proj",
    ]
    assert len(apply_lora(_model(), LoRAConfig(target_modules=["gate_proj"]))) == 3


def test_zero_init_output_equals_base_exactly() -> None:
    model = _model()
    before = _logits(model)
    apply_lora(model, LoRAConfig(r=4, alpha=8.0, target_modules=ATTN + ["gate_proj", "up_proj", "down_proj"]))
    assert torch.equal(_logits(model), before)


def test_optimizer_step_changes_only_lora_params() -> None:
    model = _model()
    snapshot = {id(p): p.detach().clone() for p in model.parameters()}
    apply_lora(model, LoRAConfig())
    _train(model, steps=1)
    changed = {n for n, p in model.named_parameters() if id(p) not in snapshot}
    assert changed == {f"{n}.lora_{ab}.weight" for n in ATTN_NAMES for ab in "AB"}
    for p in model.parameters():
        if id(p) in snapshot:
            assert torch.equal(p, snapshot[id(p)]) and p.grad is None
    assert any(m.lora_B.weight.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear))


# fp32: logits reach ~8 here, and rounding W + BA·s once instead of adding the two products differs by ~1e-5
# after 3 layers, hence the rtol; fp64 shows the merge itself is exact.
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 0.0)])
def test_merge_matches_adapted_model_and_restores_keys(dtype: torch.dtype, rtol: float) -> None:
    model = _model().to(dtype)
    original_keys = list(model.state_dict())
    apply_lora(model, LoRAConfig(dropout=0.1, target_modules=ATTN + ["gate_proj"]))
    model.train()
    _train(model, steps=3)
    model.eval()
    adapted = _logits(model)
    assert not torch.equal(adapted, _logits(_model().to(dtype)))
    merged = merge_lora(model)
    assert merged is model and not has_lora(model)
    torch.testing.assert_close(_logits(model), adapted, atol=1e-5, rtol=rtol)
    assert list(model.state_dict()) == original_keys
    assert all(p.requires_grad for p in model.parameters())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_tied_lm_head_is_wrapped_only_when_targeted_and_never_merged() -> None:
    model = _model()
    before = _logits(model)
    assert apply_lora(model, LoRAConfig(target_modules=["lm_head"])) == ["lm_head"]
    assert model.lm_head.base.weight is model.model.embed_tokens.weight
    assert torch.equal(_logits(model), before)
    with pytest.raises(ValueError, match=r"cannot merge LoRA into \['lm_head'\].*tied"):
        merge_lora(model)


def test_lora_disabled_gives_base_logits_and_restores_state() -> None:
    model = _model()
    base = _logits(model)
    apply_lora(model, LoRAConfig())
    _train(model, steps=2)
    adapted = _logits(model)
    with lora_disabled(model) as ref:
        assert torch.equal(_logits(ref), base)
    assert torch.equal(_logits(model), adapted)
    # A partly disabled model comes back as it was, also when the block raises.
    model.model.layers[0].self_attn.q_proj.enabled = False
    with pytest.raises(RuntimeError, match="boom"), lora_disabled(model):
        raise RuntimeError("boom")
    states = [m.enabled for m in model.modules() if isinstance(m, LoRALinear)]
    assert states == [False] + [True] * 11
    with pytest.raises(ValueError, match="no LoRA adapters"), lora_disabled(_model()):
        pass


def test_save_load_adapters_roundtrip(tmp_path: Path) -> None:
    cfg = LoRAConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    model = _model()
    apply_lora(model, cfg)
    _train(model, steps=2)
    save_adapters(model, tmp_path / "adapter", cfg, base_model_path="baidu/ERNIE-4.5-tiny")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.0)
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "baidu/ERNIE-4.5-tiny"
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(weights) == 12
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert weights["base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"].shape == (32, 4)

    fresh = _model()  # same seed: the same base weights
    loaded_cfg = load_adapters(fresh, tmp_path / "adapter")
    assert loaded_cfg == cfg
    assert torch.equal(_logits(fresh), _logits(model))
    assert lora_state_dict(fresh).keys() == weights.keys()


def test_load_adapters_errors(tmp_path: Path) -> None:
    cfg = LoRAConfig(r=2, alpha=4.0, target_modules=["q_proj"])
    model = _model()
    apply_lora(model, cfg)
    save_adapters(model, tmp_path, cfg)
    weights_path = tmp_path / "adapter_model.safetensors"
    good = load_file(str(weights_path))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"

    save_file({**good, "base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64)}, str(weights_path))
    with pytest.raises(ValueError, match=r"0 missing keys \[\], 1 unexpected keys \['base_model.model.lm_head"):
        load_adapters(_model(), tmp_path)
    save_file({k: v for k, v in good.items() if k != key}, str(weights_path))
    with pytest.raises(ValueError, match=rf"1 missing keys \['{key}'\]"):
        load_adapters(_model(), tmp_path)
    save_file({**good, key: torch.zeros(2, 63)}, str(weights_path))
    with pytest.raises(ValueError, match=rf"{key} has shape \(2, 63\), the model expects \(2, 64\)"):
        load_adapters(_model(), tmp_path)

    other = _model()
    apply_lora(other, LoRAConfig(r=3, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"LoRA config \(r=2, alpha=4.0\) does not match"):
        load_adapters(other, tmp_path)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapters(_model(), tmp_path / "missing")


def test_config_errors() -> None:
    with pytest.raises(ValueError, match=r"target_modules \['qkv'\] match no nn.Linear.*'lm_head'.*'q_proj'"):
        apply_lora(_model(), LoRAConfig(target_modules=["qkv"]))
    for r in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="LoRAConfig.r must be an integer >= 1"):
            apply_lora(_model(), LoRAConfig(r=r))
    with pytest.raises(ValueError, match="LoRAConfig.dropout must be in"):
        LoRAConfig(dropout=1.0).validate()
    with pytest.raises(ValueError, match="LoRAConfig.target_modules must be a non-empty list"):
        LoRAConfig(target_modules="q_proj").validate()
    model = _model()
    apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig())
