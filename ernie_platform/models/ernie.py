"""ERNIE 4.5 text model (dense 0.3B and MoE 21B-A3B / 300B-A47B) in one small file.

Matches transformers' `Ernie4_5ForCausalLM` / `Ernie4_5_MoeForCausalLM` numerically; parameter names follow the
published checkpoints except the routed experts, stored stacked as `w13_E2FD` (gate ‖ up) / `w2_EDF` for grouped GEMMs
(`checkpoint.py` maps them to the per-expert layout).

Shape legend: B batch, T tokens, D hidden, H query heads, Hk kv heads, Dh head width, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ernie_platform.models.cache import KVCache
from ernie_platform.models.config import ErnieModelArgs, MoEConfig
from ernie_platform.models.moe import MoEBlock, SwiGLU, weighted_router_loss


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """ERNIE's RoPE rotates interleaved pairs (dims 2i, 2i+1) by angle pos · θ^(-2i/Dh), computed in fp32."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles_BTd = positions_BT[..., None].float() * self.inv_freq.float()
        return angles_BTd.cos(), angles_BTd.sin()


def apply_rotary(x_BHTD: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    dtype = x_BHTD.dtype
    x = x_BHTD.float()
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos_BTd.unsqueeze(1), sin_BTd.unsqueeze(1)
    out = torch.stack((x_even * cos - x_odd * sin, x_odd * cos + x_even * sin), dim=-1).flatten(-2)
    return out.to(dtype)


class Attention(nn.Module):
    """Grouped-query attention; `mask` is a boolean [B, 1, T, S] (True = attend) or None for plain causal."""

    def __init__(self, args: ErnieModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.resolved_head_dim
        d, bias = args.hidden_size, args.use_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=bias)

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: Optional[torch.Tensor],
        cache: Optional[KVCache],
    ) -> torch.Tensor:
        b, t, _ = x_BTD.shape
        q_BHTD = self.q_proj(x_BTD).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k_BHTD = self.k_proj(x_BTD).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v_BHTD = self.v_proj(x_BTD).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_BHTD, k_BHTD = apply_rotary(q_BHTD, *rope), apply_rotary(k_BHTD, *rope)
        if cache is not None:
            k_BHTD, v_BHTD = cache.update(self.layer_idx, k_BHTD, v_BHTD)
            if t == 1 and mask is not None and not torch.is_grad_enabled():
                return self.o_proj(self._decode_attention(q_BHTD, k_BHTD, v_BHTD, mask).reshape(b, 1, -1))
        o_BHTD = F.scaled_dot_product_attention(
            q_BHTD,
            k_BHTD,
            v_BHTD,
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.head_dim**-0.5,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(o_BHTD.transpose(1, 2).reshape(b, t, -1))

    def _decode_attention(
        self, q_BH1D: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, mask_B11S: torch.Tensor
    ) -> torch.Tensor:
        """One query token per row (a decode step): the G = H / K query heads that share a KV head form the rows of
        one small matmul against that head's keys, so the keys and values are read once per KV head and never
        expanded to H heads. On CPU this is ~3x faster than SDPA for T = 1 (docs/inference.md). Returns [B, H, D]."""
        b, h, _, d = q_BH1D.shape
        kv = k_BKSD.shape[1]
        q_BKGD = q_BH1D.reshape(b, kv, h // kv, d)
        scores_BKGS = torch.matmul(q_BKGD, k_BKSD.transpose(-1, -2)).mul_(self.head_dim**-0.5)
        scores_BKGS.masked_fill_(~mask_B11S, float("-inf"))
        return torch.matmul(torch.softmax(scores_BKGS, dim=-1), v_BKSD).reshape(b, h, d)


def build_attention_mask(
    b: int,
    t: int,
    device: torch.device,
    attention_mask: Optional[torch.Tensor],
    cache: Optional[KVCache],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Boolean attention mask [B, 1, T, S] (None: plain causal) and, with a cache, the new tokens' slots [B, T].

    With a cache the T new tokens are appended to each row (right-padded, `attention_mask` marks the real ones).
    Without one, padding keys are masked; a padding query still sees itself so its unused output stays finite.
    """
    if attention_mask is not None and attention_mask.shape != (b, t):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != tokens shape {(b, t)}")
    if cache is not None:
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=device)
        slots_BT = cache.begin(attention_mask)
        return cache.attention_mask(slots_BT), slots_BT
    if attention_mask is None or bool(attention_mask.all()):
        return None, None
    idx = torch.arange(t, device=device)
    causal_TT = idx.view(-1, 1) >= idx.view(1, -1)
    mask = (causal_TT & attention_mask.bool()[:, None, :]) | torch.eye(t, dtype=torch.bool, device=device)
    return mask.unsqueeze(1), None


class DecoderLayer(nn.Module):
    def __init__(self, args: ErnieModelArgs, moe_cfg: MoEConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.mlp: nn.Module
        if args.is_moe_layer(layer_idx):
            self.mlp = MoEBlock(args, moe_cfg)
        else:
            self.mlp = SwiGLU(args.hidden_size, args.intermediate_size, bias=args.use_bias)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: Optional[torch.Tensor],
        cache: Optional[KVCache],
        token_mask_BT: Optional[torch.Tensor],
    ) -> torch.Tensor:
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), rope, mask, cache)
        h_BTD = self.post_attention_layernorm(x_BTD)
        if isinstance(self.mlp, MoEBlock):
            return x_BTD + self.mlp(h_BTD, token_mask_BT)
        return x_BTD + self.mlp(h_BTD)


@dataclass
class ErnieOutput:
    logits: torch.Tensor  # [B, T, V] (or the last `logits_to_keep` positions)
    loss: Optional[torch.Tensor] = None  # lm_loss + router_loss (training) when labels are given
    lm_loss: Optional[torch.Tensor] = None  # mean next-token cross-entropy over labelled tokens
    router_loss: Optional[torch.Tensor] = None  # coefficient-weighted router losses (training only)
    router_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted, mean over MoE layers
    expert_load: Optional[torch.Tensor] = None  # [L_moe, E] tokens routed to each expert in this forward


class ErnieModel(nn.Module):
    def __init__(self, args: ErnieModelArgs, moe_cfg: MoEConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, padding_idx=args.pad_token_id)
        self.layers = nn.ModuleList([DecoderLayer(args, moe_cfg, i) for i in range(args.num_hidden_layers)])
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args.resolved_head_dim, args.rope_theta)


class ErnieForCausalLM(nn.Module):
    """Causal LM; calling it with `input_ids` [B, T] returns an `ErnieOutput` whose `.logits` is [B, T, V]."""

    def __init__(self, args: ErnieModelArgs, moe_cfg: Optional[MoEConfig] = None):
        super().__init__()
        self.args = args
        self.moe_cfg = moe_cfg or MoEConfig()
        self.model = ErnieModel(args, self.moe_cfg)
        # transformers' dense Ernie4_5ForCausalLM never has an lm_head bias; the MoE one follows use_bias.
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=args.use_bias and args.is_moe)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    # ---- construction --------------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        init_weights(self, self.args.initializer_range)

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoEBlock)]

    # ---- forward -------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        logits_to_keep: int = 0,
    ) -> ErnieOutput:
        """`attention_mask` [B, T]: 1 for real tokens, 0 for padding. With `cache`, the T tokens are appended to
        each row (right-padded) and positions continue from each row's cached length.

        Packed documents: a boolean `attention_mask` [B, 1, T, T] (True = attend; e.g. the block-diagonal causal
        `ernie_platform.data.document_attention_mask`) is used as is, every token counts as real for the MoE
        statistics, and `position_ids` should restart at each document (no cache)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        token_mask_BT = attention_mask
        if attention_mask is not None and attention_mask.dim() == 4:
            if attention_mask.shape != (b, 1, t, t) or attention_mask.dtype != torch.bool:
                raise ValueError(
                    f"a 4-D attention_mask must be bool [B, 1, T, T] = {(b, 1, t, t)}, got "
                    f"{attention_mask.dtype} {tuple(attention_mask.shape)}"
                )
            if cache is not None:
                raise ValueError("a 4-D (packed-document) attention_mask cannot be combined with a KV cache")
            mask, slots_BT, token_mask_BT = attention_mask, None, None
        elif attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be [B, T] (padding) or bool [B, 1, T, T] (packed documents), got shape "
                f"{tuple(attention_mask.shape)}"
            )
        else:
            mask, slots_BT = build_attention_mask(b, t, input_ids.device, attention_mask, cache)
        if position_ids is None:
            position_ids = slots_BT if slots_BT is not None else torch.arange(t, device=input_ids.device).expand(b, t)

        rope = self.model.rotary_emb(position_ids)
        x_BTD = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x_BTD = layer(x_BTD, rope, mask, cache, token_mask_BT)
        if cache is not None:
            cache.end()
        x_BTD = self.model.norm(x_BTD)
        if logits_to_keep:
            x_BTD = x_BTD[:, -logits_to_keep:]
        logits = self.lm_head(x_BTD)

        out = ErnieOutput(logits=logits)
        blocks = self.moe_blocks()
        if blocks:
            out.expert_load = torch.stack([blk.last_expert_load_E for blk in blocks])
            if blocks[0].last_router_losses:
                out.router_losses = {
                    name: torch.stack([blk.last_router_losses[name] for blk in blocks]).mean()
                    for name in ("load_balance", "z", "orthogonal")
                }
                out.router_loss = weighted_router_loss(out.router_losses, self.moe_cfg)
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels and logits_to_keep cannot be combined")
            out.lm_loss = causal_lm_loss(logits, labels)
            out.loss = out.lm_loss if out.router_loss is None else out.lm_loss + out.router_loss
        return out

    @torch.no_grad()
    def update_expert_bias(self, rate: Optional[float] = None) -> None:
        """Aux-loss-free balancing step for every MoE layer (call after the optimizer step)."""
        rate = self.moe_cfg.bias_update_rate if rate is None else rate
        for blk in self.moe_blocks():
            blk.update_bias(rate)


@torch.no_grad()
def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Random init shared by the text and VL models: linear, embedding, expert and router weights N(0, std), biases
    zero (the padding embedding row too), norm weights one, router correction biases zero."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif hasattr(m, "w13_E2FD") and hasattr(m, "gate"):  # an expert pool: MoEBlock or the VL ExpertPool
            for w in (m.w13_E2FD, m.w2_EDF, m.gate.weight):
                nn.init.normal_(w, std=std)
            m.gate.e_score_correction_bias.zero_()


def causal_lm_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of token t+1 given tokens ≤ t; labels aligned with input_ids as in transformers."""
    return F.cross_entropy(*shift_for_next_token(logits_BTV, labels_BT), ignore_index=ignore_index)


def shift_for_next_token(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [N, V] of positions 0..T-2 and the labels [N] they predict (positions 1..T-1)."""
    return logits_BTV[:, :-1].reshape(-1, logits_BTV.shape[-1]).float(), labels_BT[:, 1:].reshape(-1)
