"""ERNIE's token-balanced LM loss and the VL model's per-modality router losses, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from ernie_platform.models import MoEConfig
from ernie_platform.models.vl.model import token_balanced_lm_loss


def _ce(logits: list[float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in logits)) - logits[target]


def test_token_balanced_loss_by_hand() -> None:
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [2.0, 0.0, 1.0]]])
    labels = torch.tensor([[0, 2, -100, 1]])  # predicts labels[1:] = [2, -100, 1] from positions 0..2
    per_token = [_ce([0.0, 1.0, 2.0], 2), _ce([0.5, 0.5, 0.0], 1)]
    grad_loss, logged = token_balanced_lm_loss(logits, labels, token_budget=8)
    assert logged.item() == pytest.approx(sum(per_token) / 2, abs=1e-6)
    assert grad_loss.item() == pytest.approx(sum(per_token) / 8, abs=1e-6)
    mean_loss, mean_logged = token_balanced_lm_loss(logits, labels)
    assert mean_loss.item() == pytest.approx(sum(per_token) / 2, abs=1e-6) and mean_logged == mean_loss
    with pytest.raises(ValueError, match="token_budget=0"):
        token_balanced_lm_loss(logits, labels, token_budget=0)


def test_image_heavy_batch_does_not_scale_text_tokens() -> None:
    """With a fixed budget a text token's gradient is the same whether the batch holds 1 or 5 loss tokens."""
    torch.manual_seed(0)
    logits = torch.randn(1, 7, 5)
    text_heavy = torch.randint(0, 5, (1, 7))
    image_heavy = text_heavy.clone()
    image_heavy[0, 2:6] = -100  # image positions carry no LM target
    grads = {}
    for name, labels in (("text", text_heavy), ("image", image_heavy)):
        for budget in (None, 16):
            x = logits.clone().requires_grad_()
            loss, _ = token_balanced_lm_loss(x, labels, token_budget=budget)
            loss.backward()
            grads[name, budget] = x.grad[0, 0]  # position 0 predicts a text target in both batches
    torch.testing.assert_close(grads["text", 16], grads["image", 16])
    assert not torch.allclose(grads["text", None], grads["image", None])  # the per-batch mean rescales it


def test_vl_router_losses_are_per_modality_and_weighted() -> None:
    from test_vl_model import _hf_config, _prompt

    from ernie_platform.models.vl.model import ErnieVLConfig, ErnieVLForConditionalGeneration

    moe_cfg = MoEConfig(aux_loss_coef=0.1, z_loss_coef=0.01, orthogonal_loss_coef=0.5)
    model = ErnieVLForConditionalGeneration(ErnieVLConfig.from_hf_dict(_hf_config().to_dict()), moe_cfg=moe_cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.train()
    inputs = _prompt([1, 4, 6])
    out = model(**inputs, labels=inputs["input_ids"])
    keys = {f"{m}/{n}" for m in ("text", "vision") for n in ("load_balance", "z", "orthogonal")}
    assert set(out.router_losses) == keys
    blocks = [layer.mlp for layer in model.model.language_model.layers if hasattr(layer.mlp, "last_router_losses")]
    for k in keys:
        torch.testing.assert_close(out.router_losses[k], torch.stack([b.last_router_losses[k] for b in blocks]).mean())
    coef = {"load_balance": 0.1, "z": 0.01, "orthogonal": 0.5}
    expected = sum(coef[k.split("/")[1]] * v for k, v in out.router_losses.items())
    torch.testing.assert_close(out.router_loss, expected)
    torch.testing.assert_close(out.loss, out.lm_loss + out.router_loss)
    out.loss.backward()
    assert model.model.language_model.layers[1].mlp.vision_moe.gate.weight.grad.abs().sum() > 0
