"""Post-training objectives checked against numbers computed by hand with plain python math."""

from __future__ import annotations

import math

import pytest
import torch

from ernie_platform.models import causal_lm_loss
from ernie_platform.posttrain.losses import (
    best_worst_pairs,
    clipped_policy_loss,
    dpo_loss,
    entropy_from_logits,
    group_advantages,
    kl_penalty,
    masked_mean,
    sequence_logprobs,
    token_logprobs,
    upo_pair_loss,
)


def log_sigmoid(x: float) -> float:
    return math.log(1.0 / (1.0 + math.exp(-x)))


def log_softmax(row: list[float], i: int) -> float:
    return row[i] - math.log(sum(math.exp(v) for v in row))


# ---- log-probabilities -----------------------------------------------------------------------------------------------
LOGITS_1x3x4 = [[[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0], [9.0, -9.0, 9.0, 9.0]]]


def test_token_logprobs_by_hand() -> None:
    logits = torch.tensor(LOGITS_1x3x4)
    # labels[0] is never predicted; position 0's logits predict label 3, position 1's predict label 2.
    logp, mask = token_logprobs(logits, torch.tensor([[7, 3, 2]]))
    expected = [3.0 - math.log(1 + math.e + math.e**2 + math.e**3), math.log(0.25)]
    assert logp.shape == (1, 2) and logp.dtype == torch.float32
    assert logp[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert mask.tolist() == [[True, True]]


def test_token_logprobs_ignored_labels_are_zero_and_masked() -> None:
    logp, mask = token_logprobs(torch.tensor(LOGITS_1x3x4), torch.tensor([[5, -100, 0]]))
    assert mask.tolist() == [[False, True]]
    assert logp[0, 0].item() == 0.0
    assert logp[0, 1].item() == pytest.approx(math.log(0.25), abs=1e-6)
    assert sequence_logprobs(torch.tensor(LOGITS_1x3x4), torch.tensor([[5, -100, 0]])).tolist() == pytest.approx(
        [math.log(0.25)], abs=1e-6
    )


def test_token_logprobs_bf16_logits_give_fp32() -> None:
    logp, _ = token_logprobs(torch.tensor(LOGITS_1x3x4, dtype=torch.bfloat16), torch.tensor([[7, 3, 2]]))
    assert logp.dtype == torch.float32
    assert logp[0, 1].item() == pytest.approx(math.log(0.25), abs=1e-6)


def test_token_logprobs_matches_causal_lm_loss() -> None:
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, 2] = labels[1, 4:] = labels[2, 0] = -100
    logp, mask = token_logprobs(logits, labels)
    nll = -(logp * mask).sum() / mask.sum()
    torch.testing.assert_close(nll, causal_lm_loss(logits, labels), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sequence_logprobs(logits, labels), (logp * mask).sum(-1))


def test_token_logprobs_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"logits_BTV must be \[B, T, V\]"):
        token_logprobs(torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels_BT must be \[B, T\] = \(1, 3\)"):
        token_logprobs(torch.zeros(1, 3, 4), torch.zeros(1, 4, dtype=torch.long))


def test_masked_mean() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[True, False], [True, True]])
    assert masked_mean(x, mask).item() == pytest.approx(8.0 / 3.0)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.0, 3.5])
    assert masked_mean(x, mask, dim=0).tolist() == pytest.approx([2.0, 4.0])
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    # A row mask [2, 1] broadcasts over the columns.
    assert masked_mean(x, torch.tensor([[0.0], [1.0]])).item() == pytest.approx(3.5)
    with pytest.raises(ValueError, match=r"mask of shape \(3,\) does not broadcast to x of shape \(2, 2\)"):
        masked_mean(x, torch.ones(3))


def test_masked_mean_all_masked_has_finite_gradient() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    masked_mean(x, torch.tensor([False, False])).backward()
    assert x.grad.tolist() == [0.0, 0.0]


def test_entropy_from_logits() -> None:
    # Position 0: uniform over 2 → ln 2; position 1: p = (1/4, 3/4); position 2 predicts nothing.
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 0.0]]])
    h1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_from_logits(logits, torch.tensor([[True, True]])).item() == pytest.approx(
        (math.log(2) + h1) / 2, abs=1e-6
    )
    assert entropy_from_logits(logits, torch.tensor([[True, False]])).item() == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(ValueError, match=r"mask_BT1 must be \[B, T-1\] = \(1, 2\)"):
        entropy_from_logits(logits, torch.ones(1, 3, dtype=torch.bool))


# ---- DPO / UPO -------------------------------------------------------------------------------------------------------
# Pair 0: Δ = (-1 - -1.5) - (-2 - -1.5) = 1.0; pair 1: Δ = (-3 - -2) - (-1 - -2) = -2.0.
PC, PR, RC, RR = [-1.0, -3.0], [-2.0, -1.0], [-1.5, -2.0], [-1.5, -2.0]


def _dpo_inputs(requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(v, requires_grad=requires_grad) for v in (PC, PR, RC, RR))


def test_dpo_loss_by_hand() -> None:
    beta = 0.1
    loss, metrics = dpo_loss(*_dpo_inputs(), beta=beta)
    expected = (-log_sigmoid(0.1) - log_sigmoid(-0.2)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # Implicit rewards: chosen β·(0.5, -1.0), rejected β·(-0.5, 1.0).
    assert metrics["rewards/chosen"].item() == pytest.approx((0.05 - 0.1) / 2)
    assert metrics["rewards/rejected"].item() == pytest.approx((-0.05 + 0.1) / 2)
    assert metrics["rewards/margin"].item() == pytest.approx((0.1 - 0.2) / 2)
    assert metrics["rewards/accuracy"].item() == 0.5
    assert metrics["logps/chosen"].item() == pytest.approx(-2.0)
    assert metrics["logps/rejected"].item() == pytest.approx(-1.5)
    assert all(not m.requires_grad and m.dim() == 0 for m in metrics.values())


def test_dpo_loss_label_smoothing() -> None:
    loss, _ = dpo_loss(*_dpo_inputs(), beta=0.1, label_smoothing=0.1)
    per_pair = [-0.9 * log_sigmoid(x) - 0.1 * log_sigmoid(-x) for x in (0.1, -0.2)]
    assert loss.item() == pytest.approx(sum(per_pair) / 2, abs=1e-6)


def test_dpo_loss_gradient() -> None:
    pc, pr, rc, rr = _dpo_inputs(requires_grad=True)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    loss.backward()
    # d(-logσ(βΔ))/dπc = -β(1 - σ(βΔ)), averaged over the 2 pairs; dπr is its negative.
    sig = [1 / (1 + math.exp(-x)) for x in (0.1, -0.2)]
    expected = [-0.1 * (1 - s) / 2 for s in sig]
    assert pc.grad.tolist() == pytest.approx(expected, abs=1e-7)
    assert pr.grad.tolist() == pytest.approx([-g for g in expected], abs=1e-7)


def test_upo_pair_loss_is_dpo() -> None:
    upo, upo_metrics = upo_pair_loss(*_dpo_inputs(), beta=0.3, label_smoothing=0.05)
    dpo, dpo_metrics = dpo_loss(*_dpo_inputs(), beta=0.3, label_smoothing=0.05)
    assert upo.item() == dpo.item()
    assert upo_metrics.keys() == dpo_metrics.keys()


def test_dpo_loss_errors() -> None:
    pc, pr, rc, rr = _dpo_inputs()
    with pytest.raises(ValueError, match=r"ref_rejected_B must be 1-D \[B\].*got shape \(3,\)"):
        dpo_loss(pc, pr, rc, torch.zeros(3), beta=0.1)
    with pytest.raises(ValueError, match="beta must be > 0, got 0"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\), got 0.5"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.5)


def test_best_worst_pairs() -> None:
    rewards = torch.tensor([[0.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0], [3.0, 1.0, 3.0, 1.0]])
    # Ties resolve to the first index; the all-equal group gives no pair.
    assert best_worst_pairs(rewards) == [(0, 1, 0), (2, 0, 1)]
    with pytest.raises(ValueError, match=r"rewards_GN must be 2-D \[G, N\], got shape \(4,\)"):
        best_worst_pairs(torch.zeros(4))


# ---- GRPO ------------------------------------------------------------------------------------------------------------
def test_group_advantages_by_hand() -> None:
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    # Row 0: mean 0.5, unbiased std sqrt(4 · 0.25 / 3) = 0.57735...
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert a == pytest.approx(0.866, abs=1e-3)
    assert adv[0].tolist() == pytest.approx([a, -a, -a, a], abs=1e-6)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_group_advantages_dr_grpo_and_edge_cases() -> None:
    adv = group_advantages(torch.tensor([[3.0, 1.0, 2.0]]), normalize_std=False)
    assert adv.tolist() == [[1.0, -1.0, 0.0]]
    # The mean of three 0.1s is not bitwise 0.1, yet an all-equal group must give exactly 0.
    assert group_advantages(torch.tensor([[0.1, 0.1, 0.1]], dtype=torch.float64)).tolist() == [[0.0, 0.0, 0.0]]
    assert group_advantages(torch.tensor([[0.7], [0.2]])).tolist() == [[0.0], [0.0]]
    ints = group_advantages(torch.tensor([[1, 0]]), normalize_std=False)
    assert ints.dtype == torch.float32 and ints.tolist() == [[0.5, -0.5]]
    with pytest.raises(ValueError, match=r"rewards_GN must be 2-D \[G, N\].*\(8,\)"):
        group_advantages(torch.zeros(8))


def _clip_inputs(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    old = torch.full((len(ratios), 1), -1.0)
    logp = (old + torch.tensor([[math.log(r)] for r in ratios])).requires_grad_(True)
    return logp, old


def test_clipped_policy_loss_clip_cases() -> None:
    # (ratio, A): (1.5, +1) clipped to 1.2; (1.5, -1) keeps -1.5; (0.5, +1) keeps 0.5; (0.5, -1) clipped to -0.8.
    logp, old = _clip_inputs([1.5, 1.5, 0.5, 0.5])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, metrics = clipped_policy_loss(logp, old, adv, torch.ones(4, 1, dtype=torch.bool))
    assert loss.item() == pytest.approx(-(1.2 - 1.5 + 0.5 - 0.8) / 4, abs=1e-6)
    assert metrics["clip_fraction"].item() == 0.5
    assert metrics["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)
    loss.backward()
    # Clipped tokens get no gradient; the others -ratio·A / 4.
    assert logp.grad[:, 0].tolist() == pytest.approx([0.0, 1.5 / 4, -0.5 / 4, 0.0], abs=1e-6)


def test_clipped_policy_loss_asymmetric_clip() -> None:
    # clip_high = 0.6 (DAPO clip-higher): a ratio of 1.5 with A > 0 is inside [0.8, 1.6] and no longer clipped.
    logp, old = _clip_inputs([1.5, 0.5])
    loss, metrics = clipped_policy_loss(
        logp, old, torch.tensor([1.0, -1.0]), torch.ones(2, 1), clip_low=0.2, clip_high=0.6
    )
    assert loss.item() == pytest.approx(-(1.5 - 0.8) / 2, abs=1e-6)
    assert metrics["clip_fraction"].item() == 0.5


def test_clipped_policy_loss_aggregation() -> None:
    # Ratio 1 on valid tokens, so the objective per token is its advantage; the masked token has ratio e^5.
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.0, 0.0, 0.0], [0.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([1.0, -2.0])
    token_loss, metrics = clipped_policy_loss(logp, old, adv, mask, agg="token_mean")
    assert token_loss.item() == pytest.approx(-(1 + 1 + 1 - 2) / 4)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)
    seq_loss, _ = clipped_policy_loss(logp, old, adv, mask, agg="seq_mean")
    assert seq_loss.item() == pytest.approx(-(1 + -2) / 2)
    # Per-token advantages [B, T] are accepted too.
    per_token = adv[:, None].expand(2, 3)
    assert clipped_policy_loss(logp, old, per_token, mask)[0].item() == token_loss.item()


def test_clipped_policy_loss_errors() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(
        ValueError, match=r"advantages_B must be \[B\] = \(2,\) or \[B, T\] = \(2, 3\), got shape \(3,\)"
    ):
        clipped_policy_loss(x, x, torch.zeros(3), x)
    with pytest.raises(ValueError, match=r"mask_BT must have logp_BT's shape \(2, 3\), got \(2, 2\)"):
        clipped_policy_loss(x, x, torch.zeros(2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="agg must be one of"):
        clipped_policy_loss(x, x, torch.zeros(2), x, agg="sum")


def test_kl_penalty_by_hand() -> None:
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -2.0]])
    assert kl_penalty(logp, ref, "k1")[0].tolist() == pytest.approx([0.5, 0.0])
    assert kl_penalty(logp, ref, "k2")[0].tolist() == pytest.approx([0.125, 0.0])
    k3 = kl_penalty(logp, ref, "k3")
    assert k3[0, 0].item() == pytest.approx(math.exp(-0.5) + 0.5 - 1, abs=1e-7)
    assert k3[0, 1].item() == 0.0


def test_kl_penalty_k3_non_negative() -> None:
    logp, ref = torch.randn(4, 16) * 3, torch.randn(4, 16) * 3
    assert (kl_penalty(logp, ref) >= 0).all()
    assert (kl_penalty(logp, logp) == 0).all()
    with pytest.raises(ValueError, match=r"kind must be one of \('k1', 'k2', 'k3'\), got 'k4'"):
        kl_penalty(logp, ref, kind="k4")
    with pytest.raises(ValueError, match=r"ref_logp_BT must have logp_BT's shape \(4, 16\)"):
        kl_penalty(logp, ref[:, :3])
