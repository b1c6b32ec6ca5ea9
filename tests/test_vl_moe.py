"""The VL heterogeneous MoE block equals transformers' Ernie4_5_VLMoeMoeBlock; routing is modality-isolated."""

from __future__ import annotations

import pytest
import torch
from transformers.models.ernie4_5_vl_moe.configuration_ernie4_5_vl_moe import Ernie4_5_VLMoeTextConfig
from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeMoeBlock

from ernie_platform.models.moe import load_balance_loss
from ernie_platform.models.vl.moe import VLMoEArgs, VLMoEBlock

D, E, K, F_TEXT, F_VISION = 32, 6, 2, 24, 12


def _pair(shared: int, backend: str) -> tuple[VLMoEBlock, torch.nn.Module]:
    ours = VLMoEBlock(VLMoEArgs(D, E, K, (F_TEXT, F_VISION), moe_num_shared_experts=shared), backend=backend)
    cfg = Ernie4_5_VLMoeTextConfig(
        hidden_size=D, moe_num_experts=E, moe_k=K, moe_intermediate_size=[F_TEXT, F_VISION],
        moe_num_shared_experts=shared,
    )
    ref = Ernie4_5_VLMoeMoeBlock(cfg)
    with torch.no_grad():
        for name in ("text_moe", "vision_moe"):
            pool, rpool = getattr(ours, name), getattr(ref, name)
            for p in (pool.gate.weight, pool.w13_E2FD, pool.w2_EDF):
                p.normal_(0, 0.1)
            pool.gate.e_score_correction_bias.normal_(0, 0.05)
            rpool.gate.weight.copy_(pool.gate.weight)
            rpool.gate.moe_statics.e_score_correction_bias.copy_(pool.gate.e_score_correction_bias)
            rpool.experts.gate_up_proj.copy_(pool.w13_E2FD)
            rpool.experts.down_proj.copy_(pool.w2_EDF)
        if shared:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                getattr(ours.shared_experts, proj).weight.normal_(0, 0.1)
                getattr(ref.shared_experts, proj).weight.copy_(getattr(ours.shared_experts, proj).weight)
    return ours, ref


@pytest.mark.parametrize("backend", ["torch", "eager"])
@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("kind", ["mixed", "text_only", "vision_only"])
def test_matches_transformers(backend: str, shared: int, kind: str) -> None:
    ours, ref = _pair(shared, backend)
    x = torch.randn(2, 9, D)
    types = {"mixed": torch.randint(0, 2, (2, 9)), "text_only": torch.zeros(2, 9, dtype=torch.long),
             "vision_only": torch.ones(2, 9, dtype=torch.long)}[kind]
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours = ours(x1, types)
    y_ref, _ = ref(x2, types)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y_ours)
    y_ours.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    for name in ("text_moe", "vision_moe"):
        ours_pool, ref_pool = getattr(ours, name), getattr(ref, name)
        if ref_pool.experts.gate_up_proj.grad is None:  # the pool saw no token
            assert ours_pool.w13_E2FD.grad is None or not ours_pool.w13_E2FD.grad.any()
            continue
        torch.testing.assert_close(ours_pool.w13_E2FD.grad, ref_pool.experts.gate_up_proj.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours_pool.w2_EDF.grad, ref_pool.experts.down_proj.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours_pool.gate.weight.grad, ref_pool.gate.weight.grad, rtol=1e-5, atol=1e-6)


def test_routing_is_modality_isolated_and_losses_per_modality() -> None:
    ours, _ = _pair(0, "torch")
    ours.train()
    x = torch.randn(1, 10, D)
    types = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 0, 0, 1]])
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, -2:] = 0  # one text and one vision padding token
    ours(x, types, mask)
    load = ours.last_expert_load
    assert int(load["text"].sum()) == 4 * K and int(load["vision"].sum()) == 4 * K  # 5-1 real tokens each
    # the text pool never saw a vision token: its load equals routing the real text tokens through it alone
    text_x = x[0][(types[0] == 0) & (mask[0] == 1)]
    _, probs, idx, _ = ours.text_moe.gate(text_x)
    assert torch.equal(load["text"], torch.bincount(idx.reshape(-1), minlength=E))
    losses = ours.last_router_losses
    assert set(losses) == {f"{m}/{n}" for m in ("text", "vision") for n in ("load_balance", "z", "orthogonal")}
    torch.testing.assert_close(losses["text/load_balance"], load_balance_loss(probs, idx))
    # vision experts' gradients come only from vision tokens
    x2 = x.clone().requires_grad_()
    ours(x2, torch.zeros_like(types)).sum().backward()
    assert ours.vision_moe.w13_E2FD.grad is None or ours.vision_moe.w13_E2FD.grad.abs().sum() == 0


def test_bad_token_types_shape_is_a_clear_error() -> None:
    ours, _ = _pair(0, "torch")
    with pytest.raises(ValueError, match=r"moe_mm_token_type_ids shape \(2, 3\)"):
        ours(torch.randn(2, 4, D), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[text, vision\]"):
        VLMoEArgs(D, E, K, (F_TEXT,))
