"""Grow a trained ERNIE 4.5 text MoE model into an ERNIE-4.5-VL model (the start of multimodal training).

Every text weight is copied to its VL name (embeddings, attention, norms, dense MLPs, lm_head, text experts and
router → `mlp.text_moe.*`, shared experts); the vision tower, resampler and vision experts/routers are new. Since text
tokens only use the text experts and M-RoPE equals RoPE when the (t, h, w) positions are equal, the grown model gives
the text model's logits on any text-only prompt.

With `init_vision_experts_from_text`, vision expert e starts as text expert e cut to the vision width (the first
F_vision rows of gate_proj and of up_proj, the first F_vision columns of down_proj) and the vision router starts as a
copy of the text router (weight and e_score_correction_bias); otherwise they are random like the vision tower.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ernie_platform.models.ernie import ErnieForCausalLM, init_weights
from ernie_platform.models.vl.model import ErnieVLConfig, ErnieVLForConditionalGeneration
from ernie_platform.models.vl.moe import VLMoEBlock

_TEXT_MOE_PARTS = (".mlp.gate.", ".mlp.w13_E2FD", ".mlp.w2_EDF")


def init_vl_weights(model: nn.Module, std: float = 0.02) -> None:
    """Random init of a VL model (or any of its submodules); see `ernie_platform.models.ernie.init_weights`."""
    init_weights(model, std)


def _vl_name(text_name: str) -> str:
    """VL state-dict key of a text-model key."""
    if text_name.startswith("lm_head."):
        return text_name
    if not text_name.startswith("model."):
        raise ValueError(f"unexpected text-model key {text_name!r}")
    name = "model.language_model." + text_name[len("model."):]
    for part in _TEXT_MOE_PARTS:
        if part in name:
            return name.replace(".mlp.", ".mlp.text_moe.", 1)
    return name


def check_compatible(text_model: ErnieForCausalLM, vl_cfg: ErnieVLConfig) -> None:
    """Raise a ValueError naming the first field where the text model and the VL config's text side disagree."""
    a, t = text_model.args, vl_cfg.text
    pairs: list[tuple[str, Any, Any]] = [
        ("vocab_size", a.vocab_size, t.vocab_size),
        ("hidden_size", a.hidden_size, t.hidden_size),
        ("intermediate_size", a.intermediate_size, t.intermediate_size),
        ("num_hidden_layers", a.num_hidden_layers, t.num_hidden_layers),
        ("num_attention_heads", a.num_attention_heads, t.num_attention_heads),
        ("num_key_value_heads", a.num_key_value_heads, t.num_key_value_heads),
        ("head_dim", a.resolved_head_dim, t.attention_args().resolved_head_dim),
        ("rms_norm_eps", a.rms_norm_eps, t.rms_norm_eps),
        ("rope_theta", a.rope_theta, t.rope_theta),
        ("use_bias", a.use_bias, t.use_bias),
        ("tie_word_embeddings", a.tie_word_embeddings, vl_cfg.tie_word_embeddings),
        ("moe_num_experts", a.moe_num_experts, t.moe_num_experts),
        ("moe_k", a.moe_k, t.moe_k),
        ("moe_intermediate_size", a.moe_intermediate_size, t.moe_intermediate_size[0]),
        ("moe_num_shared_experts", a.moe_num_shared_experts, t.moe_num_shared_experts),
        ("moe_norm_min", a.moe_norm_min, t.moe_norm_min),
        (
            "mlp_layer_types (MoE placement)",
            ["sparse" if a.is_moe_layer(i) else "dense" for i in range(a.num_hidden_layers)],
            list(t.mlp_layer_types),
        ),
    ]
    if not a.is_moe:
        raise ValueError("text model: moe_num_experts=0; only an MoE text model grows into ERNIE-4.5-VL")
    for name, text_value, vl_value in pairs:
        if text_value != vl_value:
            raise ValueError(f"grow_text_to_vl: {name} differs: text model {text_value!r}, VL config {vl_value!r}")
    if text_model.lm_head.bias is not None:
        raise ValueError("grow_text_to_vl: use_bias: the text model's lm_head has a bias, the VL lm_head has none")
    if any(blk.expert_parallel is not None for blk in text_model.moe_blocks()):
        raise ValueError("grow_text_to_vl: the text model is expert-parallel (sharded experts); gather it first")


@torch.no_grad()
def grow_text_to_vl(
    text_model: ErnieForCausalLM,
    vl_cfg: ErnieVLConfig,
    init_vision_experts_from_text: bool = True,
) -> tuple[ErnieVLForConditionalGeneration, list[str]]:
    """The VL model grown from `text_model` and the sorted names of its parameters that were not copied from it
    (vision tower, resampler, vision experts and routers). The model is fp32 on the text model's device."""
    check_compatible(text_model, vl_cfg)
    f_text, f_vision = vl_cfg.text.moe_intermediate_size
    if init_vision_experts_from_text and f_vision > f_text:
        raise ValueError(
            f"grow_text_to_vl: moe_intermediate_size vision width {f_vision} > text width {f_text}: vision experts "
            "cannot be cut from the text experts (pass init_vision_experts_from_text=False)"
        )
    device = text_model.model.embed_tokens.weight.device
    with torch.device(device):
        vl = ErnieVLForConditionalGeneration(vl_cfg, backend=text_model.moe_cfg.backend)
    init_vl_weights(vl, std=text_model.args.initializer_range)

    target = vl.state_dict()
    copied: set[str] = set()
    for name, value in text_model.state_dict().items():
        vl_name = _vl_name(name)
        if vl_name not in target:
            raise ValueError(f"grow_text_to_vl: text weight {name!r} has no VL counterpart {vl_name!r}")
        if target[vl_name].shape != value.shape:
            raise ValueError(
                f"grow_text_to_vl: {name!r} shape {tuple(value.shape)} != VL {vl_name!r} {tuple(target[vl_name].shape)}"
            )
        target[vl_name].copy_(value)
        copied.add(vl_name)

    if init_vision_experts_from_text:
        for layer in vl.model.language_model.layers:
            if not isinstance(layer.mlp, VLMoEBlock):
                continue
            text_pool, vision_pool = layer.mlp.text_moe, layer.mlp.vision_moe
            w13 = text_pool.w13_E2FD
            vision_pool.w13_E2FD.copy_(torch.cat([w13[:, :f_vision], w13[:, f_text:f_text + f_vision]], dim=1))
            vision_pool.w2_EDF.copy_(text_pool.w2_EDF[:, :, :f_vision])
            vision_pool.gate.weight.copy_(text_pool.gate.weight)
            vision_pool.gate.e_score_correction_bias.copy_(text_pool.gate.e_score_correction_bias)

    new = sorted(name for name, _ in vl.named_parameters() if name not in copied)
    return vl, new


__all__ = ["check_compatible", "grow_text_to_vl", "init_vl_weights"]
