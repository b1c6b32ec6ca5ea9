"""ERNIE 4.5 MoE block: fp32 router with score-correction bias, routed + shared experts, router losses.

Shape legend: T tokens, D hidden, E experts, K experts per token, F expert FFN width.

Router (as the published models): logits_TE = x·Wᵀ in fp32 → softmax → top-k chosen on probs + e_score_correction_bias
→ the chosen *unbiased* probs gathered and renormalised (denominator clamped at `moe_norm_min`).

Router losses, computed over the forward's real (non-padding) tokens:
    load balance   E · Σ_e f_e · P_e, with f_e the fraction of routed (token, k) pairs sent to e (Σ f_e = 1) and P_e
                   the mean router probability of e; 1.0 at perfect balance.
    z-loss         mean_t (logsumexp_e logits_te)²
    orthogonal     ‖Ŵ Ŵᵀ − I_E‖²_F / E², Ŵ the row-normalised gate weight (ERNIE's router orthogonal loss)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ernie_platform.kernels import moe_experts
from ernie_platform.models.config import ErnieModelArgs, MoEConfig


def load_balance_loss(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor) -> torch.Tensor:
    num_experts = probs_TE.shape[-1]
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros(())
    counts_E = torch.bincount(topk_idx_TK.reshape(-1), minlength=num_experts).to(probs_TE.dtype)
    f_E = counts_E / topk_idx_TK.numel()
    p_E = probs_TE.mean(0)
    return num_experts * torch.sum(f_E * p_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    if logits_TE.shape[0] == 0:
        return logits_TE.new_zeros(())
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


def router_orthogonal_loss(weight_ED: torch.Tensor) -> torch.Tensor:
    w_hat_ED = F.normalize(weight_ED.float(), dim=-1)
    num_experts = weight_ED.shape[0]
    gram_EE = w_hat_ED @ w_hat_ED.T
    eye = torch.eye(num_experts, device=weight_ED.device, dtype=gram_EE.dtype)
    return (gram_EE - eye).pow(2).sum() / num_experts**2


def weighted_router_loss(router_losses: dict[str, torch.Tensor], moe_cfg: MoEConfig) -> torch.Tensor:
    """Σ coefficient · loss over router losses keyed "load_balance"/"z"/"orthogonal" (optionally "<modality>/…")."""
    coef = {"load_balance": moe_cfg.aux_loss_coef, "z": moe_cfg.z_loss_coef, "orthogonal": moe_cfg.orthogonal_loss_coef}
    return sum(coef[name.rsplit("/", 1)[-1]] * value for name, value in router_losses.items())


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP (dense layers and shared experts); parameter names match the checkpoints."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_min: float):
        super().__init__()
        # Kept fp32 whatever the model dtype: routing decisions are precision-sensitive.
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(1, num_experts, dtype=torch.float32))
        self.top_k = top_k
        self.norm_min = norm_min

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (logits_TE fp32, probs_TE fp32, topk_idx_TK, topk_w_TK in x's dtype)."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
            probs_TE = F.softmax(logits_TE, dim=-1, dtype=torch.float32)
            _, topk_idx_TK = torch.topk(probs_TE + self.e_score_correction_bias.squeeze(0), self.top_k, dim=-1)
            topk_w_TK = torch.gather(probs_TE, dim=-1, index=topk_idx_TK)
            topk_w_TK = topk_w_TK / torch.clamp(topk_w_TK.sum(dim=-1, keepdim=True), min=self.norm_min)
        return logits_TE, probs_TE, topk_idx_TK, topk_w_TK.to(x_TD.dtype)


class MoEBlock(nn.Module):
    """Routed experts (dropless, via ernie_platform/kernels/) plus optional shared experts that see every token."""

    def __init__(self, args: ErnieModelArgs, moe_cfg: MoEConfig):
        super().__init__()
        d, f, e = args.hidden_size, args.moe_intermediate_size, args.moe_num_experts
        self.num_experts = e
        self.backend = moe_cfg.backend
        self.gate = Router(d, e, args.moe_k, args.moe_norm_min)
        self.w13_E2FD = nn.Parameter(torch.empty(e, 2 * f, d))  # per expert: cat(gate_proj, up_proj)
        self.w2_EDF = nn.Parameter(torch.empty(e, d, f))  # per expert: down_proj
        self.shared_experts: Optional[SwiGLU] = None
        if args.moe_num_shared_experts > 0:
            self.shared_experts = SwiGLU(d, f * args.moe_num_shared_experts, bias=args.use_bias)
        # Set by kernels.expert_parallel when moe.expert_parallel_size > 1: w13_E2FD/w2_EDF then hold only this
        # rank's experts and tokens travel to the rank holding their expert and back.
        self.expert_parallel: Optional[nn.Module] = None
        # Statistics of the latest forward, read by the trainer (logging, aux-free balancing, expert placement).
        self.last_expert_load_E: Optional[torch.Tensor] = None
        self.last_router_losses: dict[str, torch.Tensor] = {}
        self.register_buffer("load_since_update_E", torch.zeros(e, dtype=torch.float32), persistent=False)

    def forward(self, x_BTD: torch.Tensor, token_mask_BT: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, t, d = x_BTD.shape
        x_TD = x_BTD.reshape(-1, d)
        logits_TE, probs_TE, topk_idx_TK, topk_w_TK = self.gate(x_TD)
        if self.expert_parallel is not None:
            y_TD = self.expert_parallel(x_TD, topk_idx_TK, topk_w_TK, self.w13_E2FD, self.w2_EDF, self.backend)
        else:
            y_TD = moe_experts(x_TD, topk_idx_TK, topk_w_TK, self.w13_E2FD, self.w2_EDF, self.backend)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        self._record_stats(logits_TE, probs_TE, topk_idx_TK, token_mask_BT)
        return y_TD.reshape(b, t, d)

    def _record_stats(
        self,
        logits_TE: torch.Tensor,
        probs_TE: torch.Tensor,
        topk_idx_TK: torch.Tensor,
        token_mask_BT: Optional[torch.Tensor],
    ) -> None:
        if token_mask_BT is not None:
            keep_T = token_mask_BT.reshape(-1).bool()
            logits_TE, probs_TE, topk_idx_TK = logits_TE[keep_T], probs_TE[keep_T], topk_idx_TK[keep_T]
        with torch.no_grad():
            load_E = torch.bincount(topk_idx_TK.reshape(-1), minlength=self.num_experts)
            self.last_expert_load_E = load_E
            if self.training:  # evaluation and generation must not steer the aux-free bias
                self.load_since_update_E += load_E.float()
        if torch.is_grad_enabled() and self.training:
            self.last_router_losses = {
                "load_balance": load_balance_loss(probs_TE, topk_idx_TK),
                "z": router_z_loss(logits_TE),
                "orthogonal": router_orthogonal_loss(self.gate.weight),
            }
        else:
            self.last_router_losses = {}

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """Aux-loss-free balancing: bias += rate · sign(mean load − load), from the load since the last update."""
        load_E = self.load_since_update_E
        if load_E.sum() > 0:
            self.gate.e_score_correction_bias += rate * torch.sign(load_E.mean() - load_E).unsqueeze(0)
        self.load_since_update_E.zero_()
