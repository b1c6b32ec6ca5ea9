"""Post-training objectives as pure torch functions: token log-probabilities, DPO/UPO, GRPO advantages, the clipped
policy-gradient surrogate and KL estimators.

Shape suffixes: B batch (sequences), T tokens, V vocabulary, G groups (prompts), N samples per group. Token-level
tensors from `token_logprobs` have T-1 positions: position t holds log p(labels[t+1] | tokens ≤ t), the same shift
as `ernie_platform.models.ernie.causal_lm_loss`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

KL_KINDS = ("k1", "k2", "k3")
AGG_MODES = ("token_mean", "seq_mean")


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_logits_labels(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> None:
    if logits_BTV.dim() != 3:
        raise ValueError(f"logits_BTV must be [B, T, V], got shape {_shape(logits_BTV)}")
    if labels_BT.dim() != 2 or _shape(labels_BT) != _shape(logits_BTV)[:2]:
        raise ValueError(
            f"labels_BT must be [B, T] = {_shape(logits_BTV)[:2]} to match logits_BTV, got shape {_shape(labels_BT)}"
        )


# ---- log-probabilities -----------------------------------------------------------------------------------------------
def token_logprobs(
    logits_BTV: torch.Tensor, labels_BT: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities (logp_BT1, mask_BT1), both [B, T-1], aligned with labels[:, 1:].

    logp is fp32 and 0 where the label is `ignore_index`; mask is bool (True = the label counts). So
    `-(logp * mask).sum() / mask.sum()` is `causal_lm_loss(logits_BTV, labels_BT)`.
    """
    _check_logits_labels(logits_BTV, labels_BT)
    labels_BT1 = labels_BT[:, 1:]
    mask_BT1 = labels_BT1 != ignore_index
    # log_softmax casts to fp32 itself: one [B, T-1, V] fp32 tensor, no separate .float() copy of bf16 logits.
    logprobs_BTV = F.log_softmax(logits_BTV[:, :-1], dim=-1, dtype=torch.float32)
    # Ignored positions gather index 0 (always valid) and are zeroed afterwards.
    safe_labels_BT1 = labels_BT1.masked_fill(~mask_BT1, 0)
    logp_BT1 = logprobs_BTV.gather(-1, safe_labels_BT1.unsqueeze(-1)).squeeze(-1)
    return logp_BT1.masked_fill(~mask_BT1, 0.0), mask_BT1


def sequence_logprobs(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """log p(labels | prompt) per row [B]: the sum of the unmasked next-token log-probabilities (fp32)."""
    logp_BT1, _ = token_logprobs(logits_BTV, labels_BT, ignore_index)
    return logp_BT1.sum(dim=-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is set (mask broadcast to x); 0 where nothing is set."""
    try:
        torch.broadcast_shapes(x.shape, mask.shape)
    except RuntimeError as e:
        raise ValueError(f"mask of shape {_shape(mask)} does not broadcast to x of shape {_shape(x)}") from e
    weights = mask.to(x.dtype if x.is_floating_point() else torch.float32).expand_as(x)
    total = (x * weights).sum() if dim is None else (x * weights).sum(dim=dim)
    count = weights.sum() if dim is None else weights.sum(dim=dim)
    # Dividing by 1 where nothing is set (total is 0 there) keeps both the value and the gradient finite.
    return total / torch.where(count > 0, count, torch.ones_like(count))


def entropy_from_logits(logits_BTV: torch.Tensor, mask_BT1: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy (nats, fp32) of the next-token distributions at the positions of `mask_BT1`.

    `mask_BT1` is [B, T-1], aligned like `token_logprobs` (the distribution at position t predicts label t+1).
    """
    if logits_BTV.dim() != 3:
        raise ValueError(f"logits_BTV must be [B, T, V], got shape {_shape(logits_BTV)}")
    b, t, _ = logits_BTV.shape
    if _shape(mask_BT1) != (b, t - 1):
        raise ValueError(f"mask_BT1 must be [B, T-1] = {(b, t - 1)} for logits_BTV, got shape {_shape(mask_BT1)}")
    logprobs_BTV = F.log_softmax(logits_BTV[:, :-1], dim=-1, dtype=torch.float32)
    entropy_BT1 = -(logprobs_BTV.exp() * logprobs_BTV).sum(dim=-1)
    return masked_mean(entropy_BT1, mask_BT1)


# ---- preference optimization -----------------------------------------------------------------------------------------
def dpo_loss(
    policy_chosen_B: torch.Tensor,
    policy_rejected_B: torch.Tensor,
    ref_chosen_B: torch.Tensor,
    ref_rejected_B: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO (Rafailov et al. 2023) on sequence log-probabilities [B]; returns (mean loss, metrics).

    With Δ = (πc − rc) − (πr − rr): loss = −(1 − ls)·logσ(βΔ) − ls·logσ(−βΔ) (conservative DPO: `label_smoothing`
    is the assumed probability that a preference label is flipped). Metrics are detached scalars: `rewards/chosen`,
    `rewards/rejected` (mean implicit rewards β(π − r)), `rewards/margin`, `rewards/accuracy` (share of pairs whose
    chosen reward is strictly higher), `logps/chosen`, `logps/rejected` (mean policy log-probabilities).
    """
    named = {
        "policy_chosen_B": policy_chosen_B,
        "policy_rejected_B": policy_rejected_B,
        "ref_chosen_B": ref_chosen_B,
        "ref_rejected_B": ref_rejected_B,
    }
    for name, x in named.items():
        if x.dim() != 1 or x.shape != policy_chosen_B.shape:
            raise ValueError(
                f"{name} must be 1-D [B] like policy_chosen_B {_shape(policy_chosen_B)}, got shape {_shape(x)}"
            )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")

    chosen_rewards_B = beta * (policy_chosen_B - ref_chosen_B)
    rejected_rewards_B = beta * (policy_rejected_B - ref_rejected_B)
    logits_B = chosen_rewards_B - rejected_rewards_B  # = β·Δ
    losses_B = -(1.0 - label_smoothing) * F.logsigmoid(logits_B) - label_smoothing * F.logsigmoid(-logits_B)
    metrics = {
        "rewards/chosen": chosen_rewards_B.detach().mean(),
        "rewards/rejected": rejected_rewards_B.detach().mean(),
        "rewards/margin": logits_B.detach().mean(),
        "rewards/accuracy": (chosen_rewards_B > rejected_rewards_B).float().mean().detach(),
        "logps/chosen": policy_chosen_B.detach().mean(),
        "logps/rejected": policy_rejected_B.detach().mean(),
    }
    return losses_B.mean(), metrics


# The preference half of ERNIE 4.5's UPO (unified preference optimization): DPO on online pairs. The pairs are the
# best and worst sampled completions of a prompt (`best_worst_pairs` on their verifiable rewards), so the objective is
# exactly `dpo_loss`; the name only says where the pairs come from.
upo_pair_loss = dpo_loss


def best_worst_pairs(rewards_GN: torch.Tensor) -> list[tuple[int, int, int]]:
    """(group, index of the highest reward, index of the lowest) per group of `rewards_GN` [G, N].

    Ties resolve to the first occurrence; groups whose rewards are all equal carry no preference and are skipped.
    """
    if rewards_GN.dim() != 2:
        raise ValueError(f"rewards_GN must be 2-D [G, N], got shape {_shape(rewards_GN)}")
    pairs = []
    for g, row in enumerate(rewards_GN.tolist()):
        if not row:
            continue
        # max/min over indices return the first index among equal values.
        best = max(range(len(row)), key=row.__getitem__)
        worst = min(range(len(row)), key=row.__getitem__)
        if row[best] > row[worst]:
            pairs.append((g, best, worst))
    return pairs


# ---- policy gradient (GRPO / PPO / DAPO) -----------------------------------------------------------------------------
def group_advantages(rewards_GN: torch.Tensor, eps: float = 1e-6, normalize_std: bool = True) -> torch.Tensor:
    """GRPO group-relative advantages [G, N]: (r − group mean) / (group std + eps), std unbiased as in TRL/verl.

    `normalize_std=False` gives r − group mean (Dr. GRPO, which drops the std to avoid weighting easy and hard
    prompts differently). Groups whose rewards are all equal, and groups of one sample, get exactly 0.
    """
    if rewards_GN.dim() != 2:
        raise ValueError(f"rewards_GN must be 2-D [G, N] (prompts x samples per prompt), got {_shape(rewards_GN)}")
    rewards_GN = rewards_GN if rewards_GN.is_floating_point() else rewards_GN.float()
    if rewards_GN.shape[1] < 2:
        return torch.zeros_like(rewards_GN)
    # Explicit, because the mean of equal floats (0.1 three times) is not always bitwise that float.
    constant_G1 = (rewards_GN == rewards_GN[:, :1]).all(dim=1, keepdim=True)
    centered_GN = torch.where(constant_G1, 0.0, rewards_GN - rewards_GN.mean(dim=1, keepdim=True))
    if not normalize_std:
        return centered_GN
    return centered_GN / (rewards_GN.std(dim=1, keepdim=True, correction=1) + eps)


def clipped_policy_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO/GRPO clipped surrogate: loss = −aggregate(min(ρA, clip(ρ, 1 − clip_low, 1 + clip_high)·A)), ρ = e^(logp−old).

    `advantages_B` is one advantage per sequence [B] (GRPO), or per token [B, T]. `old_logp_BT` is treated as a
    constant. `agg`: "token_mean" averages over every valid token of the batch (DAPO: long answers are not
    down-weighted); "seq_mean" averages within each sequence, then over the sequences that have a valid token
    (original GRPO). Separate `clip_low`/`clip_high` allow DAPO's clip-higher.

    Metrics (detached): `clip_fraction`, the share of valid tokens where the clipped term was strictly smaller (so
    the clip removed the gradient), and `ratio_mean`, the mean ratio over valid tokens.
    """
    if logp_BT.dim() != 2:
        raise ValueError(f"logp_BT must be 2-D [B, T], got shape {_shape(logp_BT)}")
    for name, x in (("old_logp_BT", old_logp_BT), ("mask_BT", mask_BT)):
        if x.shape != logp_BT.shape:
            raise ValueError(f"{name} must have logp_BT's shape {_shape(logp_BT)}, got {_shape(x)}")
    b = logp_BT.shape[0]
    if advantages_B.dim() == 1 and advantages_B.shape[0] == b:
        advantages_BT = advantages_B.unsqueeze(1)
    elif advantages_B.shape == logp_BT.shape:
        advantages_BT = advantages_B
    else:
        raise ValueError(
            f"advantages_B must be [B] = ({b},) or [B, T] = {_shape(logp_BT)}, got shape {_shape(advantages_B)}"
        )
    if not (clip_low >= 0 and clip_high >= 0):
        raise ValueError(f"clip_low and clip_high must be >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")

    advantages_BT = advantages_BT.detach().float()
    ratio_BT = torch.exp(logp_BT.float() - old_logp_BT.detach().float())
    unclipped_BT = ratio_BT * advantages_BT
    clipped_BT = torch.clamp(ratio_BT, 1.0 - clip_low, 1.0 + clip_high) * advantages_BT
    objective_BT = torch.minimum(unclipped_BT, clipped_BT)

    mask_BT = mask_BT.bool()
    if agg == "token_mean":
        objective = masked_mean(objective_BT, mask_BT)
    else:
        has_tokens_B = mask_BT.any(dim=1)
        objective = masked_mean(masked_mean(objective_BT, mask_BT, dim=1), has_tokens_B)
    metrics = {
        "clip_fraction": masked_mean((clipped_BT < unclipped_BT).float(), mask_BT).detach(),
        "ratio_mean": masked_mean(ratio_BT, mask_BT).detach(),
    }
    return -objective, metrics


def kl_penalty(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate [B, T] of KL(π ‖ π_ref) from log-probabilities of tokens sampled from π (Schulman 2020).

    k1 = logp − ref (unbiased, can be negative); k2 = ½(logp − ref)² (biased, low variance); k3 = e^(ref−logp) −
    (ref − logp) − 1 (unbiased and ≥ 0; the one GRPO uses).
    """
    if logp_BT.shape != ref_logp_BT.shape:
        raise ValueError(f"ref_logp_BT must have logp_BT's shape {_shape(logp_BT)}, got {_shape(ref_logp_BT)}")
    if kind == "k1":
        return logp_BT - ref_logp_BT
    if kind == "k2":
        return 0.5 * (logp_BT - ref_logp_BT).square()
    if kind == "k3":
        log_ratio_BT = ref_logp_BT - logp_BT
        # expm1 keeps k3 accurate (and ≥ 0) for tiny differences, where exp(x) - 1 would cancel.
        return torch.expm1(log_ratio_BT) - log_ratio_BT
    raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
