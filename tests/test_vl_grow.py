"""Growing a text MoE model into ERNIE-4.5-VL: text logits preserved, new parameters listed, vision experts cut."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ernie_platform.configs import to_model_args, to_vl_config
from ernie_platform.models import ErnieForCausalLM
from ernie_platform.models.vl.grow import grow_text_to_vl
from ernie_platform.models.vl.text import VLTextArgs

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"


def _pair(name: str = "ernie45_tiny_vl"):
    node = OmegaConf.load(CONF_MODEL / f"{name}.yaml")
    torch.manual_seed(0)
    text = ErnieForCausalLM(to_model_args(node)).eval()
    with torch.no_grad():  # non-trivial router biases, so the copy of e_score_correction_bias matters
        for blk in text.moe_blocks():
            blk.gate.e_score_correction_bias.normal_(std=0.05)
    return text, to_vl_config(node)


@pytest.mark.parametrize("init_from_text", [True, False])
def test_text_prompt_logits_unchanged(init_from_text: bool) -> None:
    text, cfg = _pair()
    vl, _ = grow_text_to_vl(text, cfg, init_vision_experts_from_text=init_from_text)
    vl.eval()
    ids = torch.randint(16, 272, (2, 23), generator=torch.Generator().manual_seed(1))
    zeros = torch.zeros_like(ids)
    with torch.no_grad():
        ref = text(ids).logits
        out = vl(ids, mm_token_type_ids=zeros, moe_mm_token_type_ids=zeros).logits
        out_no_types = vl(ids).logits
    assert (out - ref).abs().max().item() <= 1e-5
    assert (out_no_types - ref).abs().max().item() <= 1e-5


def test_demo_grows_and_keeps_logits() -> None:
    text, cfg = _pair("ernie45_demo_vl")
    vl, new = grow_text_to_vl(text, cfg)
    ids = torch.randint(16, 272, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (vl.eval()(ids).logits - text(ids).logits).abs().max().item() <= 1e-5
    assert new and all("vision" in n or "resampler" in n for n in new)


def test_new_parameter_list() -> None:
    text, cfg = _pair()
    vl, new = grow_text_to_vl(text, cfg)
    assert new == sorted(new)
    names = {n for n, _ in vl.named_parameters()}
    vision_prefixes = ("model.vision_tower.", "model.resampler_model.")
    expected = {n for n in names if n.startswith(vision_prefixes) or ".vision_moe." in n}
    assert set(new) == expected
    assert any(n.startswith("model.vision_tower.") for n in new)
    assert any(n.startswith("model.resampler_model.") for n in new)
    assert any(".vision_moe.gate.weight" in n for n in new) and any(".vision_moe.w13_E2FD" in n for n in new)
    assert not any("text_moe" in n or "embed_tokens" in n or "shared_experts" in n or "self_attn" in n for n in new)
    # everything else was copied from the text model, value for value
    text_sd, vl_sd = text.state_dict(), vl.state_dict()
    lm = "model.language_model.layers"
    assert torch.equal(vl_sd[f"{lm}.1.mlp.text_moe.w13_E2FD"], text_sd["model.layers.1.mlp.w13_E2FD"])
    assert torch.equal(
        vl_sd[f"{lm}.2.mlp.text_moe.gate.e_score_correction_bias"],
        text_sd["model.layers.2.mlp.gate.e_score_correction_bias"],
    )
    assert torch.equal(vl_sd[f"{lm}.0.mlp.gate_proj.weight"], text_sd["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(vl_sd["lm_head.weight"], text_sd["lm_head.weight"])


def test_vision_experts_are_cut_text_experts() -> None:
    text, cfg = _pair()
    vl, _ = grow_text_to_vl(text, cfg, init_vision_experts_from_text=True)
    f_text, f_vision = cfg.text.moe_intermediate_size
    for i, blk in enumerate(text.moe_blocks()):
        vmoe = vl.model.language_model.layers[i + 1].mlp.vision_moe
        assert vmoe.w13_E2FD.shape == (blk.w13_E2FD.shape[0], 2 * f_vision, blk.w13_E2FD.shape[2])
        for e in range(blk.num_experts):
            gate, up = blk.w13_E2FD[e, :f_text], blk.w13_E2FD[e, f_text:]
            assert torch.equal(vmoe.w13_E2FD[e, :f_vision], gate[:f_vision])
            assert torch.equal(vmoe.w13_E2FD[e, f_vision:], up[:f_vision])
            assert torch.equal(vmoe.w2_EDF[e], blk.w2_EDF[e, :, :f_vision])
        assert torch.equal(vmoe.gate.weight, blk.gate.weight)
        assert torch.equal(vmoe.gate.e_score_correction_bias, blk.gate.e_score_correction_bias)


def test_random_vision_experts_and_fresh_init() -> None:
    text, cfg = _pair()
    vl, _ = grow_text_to_vl(text, cfg, init_vision_experts_from_text=False)
    vmoe = vl.model.language_model.layers[1].mlp.vision_moe
    assert not torch.equal(vmoe.w2_EDF, text.moe_blocks()[0].w2_EDF[:, :, : cfg.text.moe_intermediate_size[1]])
    assert torch.count_nonzero(vmoe.gate.e_score_correction_bias) == 0
    assert abs(vmoe.w13_E2FD.std().item() - 0.02) < 0.005
    block = vl.model.vision_tower.blocks[0]
    assert torch.equal(block.norm1.weight, torch.ones_like(block.norm1.weight))
    assert torch.count_nonzero(block.attn.qkv.bias) == 0
    after_norm = vl.model.resampler_model.after_norm.weight
    assert torch.equal(after_norm, torch.ones_like(after_norm))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_size", 32),
        ("num_hidden_layers", 4),
        ("num_attention_heads", 8),
        ("vocab_size", 384),
        ("moe_num_experts", 4),
        ("mlp_layer_types", ["dense", "dense", "sparse"]),
    ],
)
def test_incompatible_config_names_the_field(field: str, value) -> None:
    text, cfg = _pair()
    kw = {k: getattr(cfg.text, k) for k in VLTextArgs.__dataclass_fields__}
    kw[field] = value
    if field == "num_hidden_layers":
        kw["mlp_layer_types"] = ["dense"] + ["sparse"] * (value - 1)
    if field in ("hidden_size", "num_attention_heads"):
        kw["head_dim"] = cfg.text.head_dim
    cfg.text = VLTextArgs(**kw)
    with pytest.raises(ValueError, match=field):
        grow_text_to_vl(text, cfg)


def test_vision_wider_than_text_needs_random_init() -> None:
    text, cfg = _pair()
    kw = {k: getattr(cfg.text, k) for k in VLTextArgs.__dataclass_fields__}
    kw["moe_intermediate_size"] = [cfg.text.moe_intermediate_size[0], 64]
    cfg.text = VLTextArgs(**kw)
    with pytest.raises(ValueError, match="init_vision_experts_from_text"):
        grow_text_to_vl(text, cfg)
    grow_text_to_vl(text, cfg, init_vision_experts_from_text=False)
