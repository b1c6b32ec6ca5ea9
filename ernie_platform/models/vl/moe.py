"""ERNIE-4.5-VL heterogeneous MoE block: separate text and vision expert pools with modality-isolated routing.

Every token is routed only among the experts of its own modality (text tokens: `text_moe`, image/video tokens:
`vision_moe`), each pool with its own fp32 router (softmax, top-k on probs + e_score_correction_bias, renormalised
unbiased weights — the same router as the text models) and its own expert width (`moe_intermediate_size` =
[text, vision], e.g. [1536, 512]). Shared experts (width text × `moe_num_shared_experts`) see every token.

Parameter names follow transformers' `Ernie4_5_VLMoeMoeBlock`, with each pool's experts stacked like the text model's:
    text_moe.gate.weight, text_moe.gate.e_score_correction_bias, text_moe.w13_E2FD, text_moe.w2_EDF, (vision_moe.…)

Router losses are per modality, over that modality's own real tokens: load balance and z-loss of each pool, and the
orthogonal loss of each gate; `last_router_losses` holds them as `{"text/load_balance": …, "vision/z": …}`.

Shape legend: B batch, T tokens, D hidden, E experts of a pool, K experts per token, F a pool's expert width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ernie_platform.kernels import moe_experts
from ernie_platform.models.moe import Router, SwiGLU, load_balance_loss, router_orthogonal_loss, router_z_loss

MODALITIES = ("text", "vision")


@dataclass
class VLMoEArgs:
    hidden_size: int
    moe_num_experts: int
    moe_k: int
    moe_intermediate_size: tuple[int, int]  # (text, vision)
    moe_num_shared_experts: int = 0
    moe_norm_min: float = 1e-12
    use_bias: bool = False

    def __post_init__(self) -> None:
        if len(self.moe_intermediate_size) != 2:
            raise ValueError(
                f"moe_intermediate_size={list(self.moe_intermediate_size)} must be [text, vision] (two widths)"
            )
        if not 1 <= self.moe_k <= self.moe_num_experts:
            raise ValueError(f"moe_k={self.moe_k} must be in [1, moe_num_experts={self.moe_num_experts}]")


class ExpertPool(nn.Module):
    """One modality's router and routed experts (dropless, via ernie_platform/kernels/)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, ffn: int, norm_min: float, backend: str):
        super().__init__()
        self.num_experts = num_experts
        self.backend = backend
        self.gate = Router(hidden, num_experts, top_k, norm_min)
        self.w13_E2FD = nn.Parameter(torch.empty(num_experts, 2 * ffn, hidden))
        self.w2_EDF = nn.Parameter(torch.empty(num_experts, hidden, ffn))

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (y_TD, logits_TE, probs_TE, topk_idx_TK)."""
        logits_TE, probs_TE, topk_idx_TK, topk_w_TK = self.gate(x_TD)
        y_TD = moe_experts(x_TD, topk_idx_TK, topk_w_TK, self.w13_E2FD, self.w2_EDF, self.backend)
        return y_TD, logits_TE, probs_TE, topk_idx_TK


class VLMoEBlock(nn.Module):
    def __init__(self, args: VLMoEArgs, backend: str = "torch"):
        super().__init__()
        d, e, k = args.hidden_size, args.moe_num_experts, args.moe_k
        f_text, f_vision = args.moe_intermediate_size
        self.text_moe = ExpertPool(d, e, k, f_text, args.moe_norm_min, backend)
        self.vision_moe = ExpertPool(d, e, k, f_vision, args.moe_norm_min, backend)
        self.shared_experts: Optional[SwiGLU] = None
        if args.moe_num_shared_experts > 0:
            self.shared_experts = SwiGLU(d, f_text * args.moe_num_shared_experts, bias=args.use_bias)
        self.last_expert_load: dict[str, torch.Tensor] = {}
        self.last_router_losses: dict[str, torch.Tensor] = {}

    def forward(
        self,
        x_BTD: torch.Tensor,
        moe_mm_token_type_ids_BT: Optional[torch.Tensor] = None,
        token_mask_BT: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """`moe_mm_token_type_ids_BT`: 0 for text tokens, non-zero (image 1, video 2) for vision tokens."""
        b, t, d = x_BTD.shape
        x_TD = x_BTD.reshape(-1, d)
        if moe_mm_token_type_ids_BT is None:
            vision_T = torch.zeros(b * t, dtype=torch.bool, device=x_BTD.device)
        else:
            if moe_mm_token_type_ids_BT.shape != (b, t):
                raise ValueError(
                    f"moe_mm_token_type_ids shape {tuple(moe_mm_token_type_ids_BT.shape)} != tokens shape {(b, t)}"
                )
            vision_T = moe_mm_token_type_ids_BT.reshape(-1).bool()
        real_T = None if token_mask_BT is None else token_mask_BT.reshape(-1).bool()

        y_TD = torch.zeros_like(x_TD)
        self.last_expert_load, losses = {}, {}
        for name, pool, sel_T in (("text", self.text_moe, ~vision_T), ("vision", self.vision_moe, vision_T)):
            idx_S = sel_T.nonzero().squeeze(-1)
            if idx_S.numel() == 0:
                self.last_expert_load[name] = torch.zeros(pool.num_experts, dtype=torch.long, device=x_TD.device)
                continue
            y_SD, logits_SE, probs_SE, topk_idx_SK = pool(x_TD.index_select(0, idx_S))
            y_TD = y_TD.index_add(0, idx_S, y_SD)
            if real_T is not None:
                keep_S = real_T.index_select(0, idx_S)
                logits_SE, probs_SE, topk_idx_SK = logits_SE[keep_S], probs_SE[keep_S], topk_idx_SK[keep_S]
            self.last_expert_load[name] = torch.bincount(topk_idx_SK.reshape(-1), minlength=pool.num_experts)
            if torch.is_grad_enabled() and self.training and logits_SE.shape[0]:
                losses[f"{name}/load_balance"] = load_balance_loss(probs_SE, topk_idx_SK)
                losses[f"{name}/z"] = router_z_loss(logits_SE)
        if torch.is_grad_enabled() and self.training:
            for name, pool in (("text", self.text_moe), ("vision", self.vision_moe)):
                losses[f"{name}/orthogonal"] = router_orthogonal_loss(pool.gate.weight)
        self.last_router_losses = losses
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.reshape(b, t, d)
