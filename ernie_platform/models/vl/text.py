"""ERNIE-4.5-VL language model: 3D rotary positions (M-RoPE) and heterogeneous MoE layers.

Numerically the same as transformers' `Ernie4_5_VLMoeTextModel`; parameter names follow it (routed experts stacked
per pool as in `vl/moe.py`).

M-RoPE: the rotary pairs (dims 2j, 2j+1, j < Dh/2) are split by `mrope_section` = [s_h, s_w, s_t] (s_h == s_w; the
published models use [22, 22, 20]). Pair j < s_h + s_w rotates by the *height* position when j is even and the *width*
position when j is odd; the last s_t pairs rotate by the *temporal* position; pair j always uses the frequency
θ^(-2j/Dh). Text tokens have equal (t, h, w) positions, so for text this is the text model's RoPE.

Shape legend: B batch, T tokens, D hidden, J rotary pairs (Dh/2), A position axes (t, h, w).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from torch import nn

from ernie_platform.models.cache import KVCache
from ernie_platform.models.config import ErnieModelArgs
from ernie_platform.models.ernie import Attention, RMSNorm, build_attention_mask
from ernie_platform.models.moe import SwiGLU
from ernie_platform.models.vl.moe import VLMoEArgs, VLMoEBlock


@dataclass
class VLTextArgs:
    vocab_size: int = 103424
    hidden_size: int = 2560
    intermediate_size: int = 12288
    num_hidden_layers: int = 28
    num_attention_heads: int = 20
    num_key_value_heads: int = 4
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    mrope_section: List[int] = field(default_factory=lambda: [22, 22, 20])
    use_bias: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: Optional[int] = None
    moe_num_experts: int = 64
    moe_k: int = 6
    moe_intermediate_size: List[int] = field(default_factory=lambda: [1536, 512])
    moe_num_shared_experts: int = 2
    moe_norm_min: float = 1e-12
    mlp_layer_types: Optional[List[str]] = None  # "dense" | "sparse" per layer; default: dense first, then sparse

    def __post_init__(self) -> None:
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["dense"] + ["sparse"] * (self.num_hidden_layers - 1)
        if len(self.mlp_layer_types) != self.num_hidden_layers or set(self.mlp_layer_types) - {"dense", "sparse"}:
            raise ValueError(
                f"mlp_layer_types={self.mlp_layer_types} must list 'dense'/'sparse' for each of the "
                f"{self.num_hidden_layers} layers"
            )
        s_h, s_w, s_t = self.mrope_section
        if s_h != s_w or s_h + s_w + s_t != self.attention_args().resolved_head_dim // 2:
            raise ValueError(
                f"mrope_section={self.mrope_section} must be [s, s, t] with 2s + t = head_dim/2 "
                f"({self.attention_args().resolved_head_dim // 2})"
            )

    def attention_args(self) -> ErnieModelArgs:
        """The text-model args the shared attention/norm modules are built from."""
        return ErnieModelArgs(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, use_bias=self.use_bias, tie_word_embeddings=self.tie_word_embeddings,
        )

    def moe_args(self) -> VLMoEArgs:
        return VLMoEArgs(
            self.hidden_size, self.moe_num_experts, self.moe_k, tuple(self.moe_intermediate_size),
            self.moe_num_shared_experts, self.moe_norm_min, self.use_bias,
        )

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> VLTextArgs:
        """From a transformers `text_config` dict (rope in `rope_parameters`, or top-level `rope_theta`)."""
        names = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in d.items() if k in names}
        rope = d.get("rope_parameters") or {}
        if "rope_theta" in rope or "rope_theta" in d:
            kwargs["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta")))
        if "mrope_section" in rope:
            kwargs["mrope_section"] = list(rope["mrope_section"])
        return cls(**kwargs)


class MRotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, mrope_section: list[int]):
        super().__init__()
        inv_freq_J = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        hw = mrope_section[0] + mrope_section[1]
        j = torch.arange(head_dim // 2)
        # axis of each pair: 0 = temporal, 1 = height (even j < hw), 2 = width (odd j < hw)
        axis_J = torch.where(j < hw, 1 + (j % 2), torch.zeros_like(j))
        self.register_buffer("inv_freq_J", inv_freq_J, persistent=False)
        self.register_buffer("axis_J", axis_J, persistent=False)

    def forward(self, positions_ABT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos_BTJ = positions_ABT[self.axis_J].permute(1, 2, 0).float()
        angles_BTJ = pos_BTJ * self.inv_freq_J
        return angles_BTJ.cos(), angles_BTJ.sin()


class VLDecoderLayer(nn.Module):
    def __init__(self, args: VLTextArgs, layer_idx: int, backend: str):
        super().__init__()
        attn_args = args.attention_args()
        self.self_attn = Attention(attn_args, layer_idx)
        self.mlp: nn.Module
        if args.mlp_layer_types[layer_idx] == "sparse":
            self.mlp = VLMoEBlock(args.moe_args(), backend=backend)
        else:
            self.mlp = SwiGLU(args.hidden_size, args.intermediate_size, bias=args.use_bias)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x_BTD, rope, mask, cache, moe_mm_token_type_ids_BT, token_mask_BT) -> torch.Tensor:
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), rope, mask, cache)
        h_BTD = self.post_attention_layernorm(x_BTD)
        if isinstance(self.mlp, VLMoEBlock):
            return x_BTD + self.mlp(h_BTD, moe_mm_token_type_ids_BT, token_mask_BT)
        return x_BTD + self.mlp(h_BTD)


class VLTextModel(nn.Module):
    """Embeddings, decoder layers and final norm (no head): the `language_model` of the VL model."""

    def __init__(self, args: VLTextArgs, backend: str = "torch"):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, padding_idx=args.pad_token_id)
        self.layers = nn.ModuleList([VLDecoderLayer(args, i, backend) for i in range(args.num_hidden_layers)])
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = MRotaryEmbedding(args.attention_args().resolved_head_dim, args.rope_theta, args.mrope_section)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        moe_mm_token_type_ids: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """Returns the final hidden states [B, T, D]. `position_ids`: [3, B, T] (t, h, w), [B, T], or None."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x_BTD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = x_BTD.shape
        mask, slots_BT = build_attention_mask(b, t, x_BTD.device, attention_mask, cache)
        if position_ids is None:
            position_ids = slots_BT if slots_BT is not None else torch.arange(t, device=x_BTD.device).expand(b, t)
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        if position_ids.shape != (3, b, t):
            raise ValueError(f"position_ids must be [3, B, T] = [3, {b}, {t}], got {tuple(position_ids.shape)}")
        rope = self.rotary_emb(position_ids)
        for layer in self.layers:
            x_BTD = layer(x_BTD, rope, mask, cache, moe_mm_token_type_ids, attention_mask)
        if cache is not None:
            cache.end()
        return self.norm(x_BTD)
