"""ERNIE-4.5-VL vision side: the ViT encoder and the variable-resolution resampler adapter.

Numerically identical (fp32) to transformers' `Ernie4_5_VLMoeVisionTransformerPretrainedModel` (`vision_tower`) and
`Ernie4_5_VLMoeVariableResolutionResamplerModel` (`resampler_model`). Parameter names equal the reference's state_dict
keys below those two prefixes, so a transformers checkpoint loads with a plain prefix strip. The original published
(PaddlePaddle-era) checkpoints differ only in names transformers renames on load:

    vision_model.*                          -> vision_tower.*            (prefix only; sub-keys identical)
    resampler_model.{spatial,temporal}_linear.0 / .2 / .3
                                            -> ...{spatial,temporal}_linear.fc1 / .fc2 / .ln

(`resampler_key_from_published` applies the second rename.)

Inputs are what the image processor produces: `pixel_values` [N, K] with one row per 14×14 patch, already ordered
block-major over `merge×merge` spatial blocks, and `grid_thw` [I, 3] (t, h, w in patches) per image/video. ERNIE's
image processor uses temporal_patch_size 1, so K = in_channels·patch² (588), not C·T·P·P.

Reference behaviour reproduced on purpose:
  * attention is restricted to each *frame* (segments of h·w patches, t per entry), not to the whole clip;
  * 2D rotary: head_dim/4 frequencies, angles laid out [h-angles ‖ w-angles ‖ h-angles ‖ w-angles] with
    rotate-half, computed in fp32; positions follow the block-major patch order;
  * vision "rms_norm_eps" is the eps of plain LayerNorms (with bias);
  * the resampler's 2×2 spatial merge is a reshape of consecutive tokens (relies on the block-major order);
  * the temporal merge (hard-coded for 2) pairs frames (0,1), (2,3), ... per entry and concatenates each pair's
    features; an entry with t == 1 (an image) is paired with itself (duplicated), and with odd t > 1 the last
    frame is dropped (zip truncation in the reference);
  * the final norm is the text model's RMSNorm with the text eps.

Shape legend: N patches (vision tokens, all images packed), K patch pixels (in_channels·patch²), D vision width,
H heads, Dh head width, F vision MLP width, I images/videos, M spatially merged tokens (N / merge²),
S merged width (D·merge²), T tokens after the temporal merge, L text (language-model) hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ernie_platform.models.ernie import RMSNorm

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}

_PUBLISHED_VISION_TYPE = "DFNRope_vision_transformer"


# ---- configs ---------------------------------------------------------------------------------------------------------
@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"vision head_dim {self.head_dim} must be a multiple of 4 for the 2D rotary embedding")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"vision hidden_act {self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size * self.patch_size

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> VisionConfig:
        """Build from a `vision_config` dict: transformers' (`ernie4_5_vl_moe_vision`) or the published one
        (`DFNRope_vision_transformer`: width `embed_dim`, MLP width `embed_dim·mlp_ratio`, LayerNorm eps 1e-6).
        Keys that do not change the forward are ignored; defaults are transformers' `Ernie4_5_VLMoeVisionConfig`'s."""
        if d.get("model_type") == _PUBLISHED_VISION_TYPE or "embed_dim" in d:
            width = int(d.get("embed_dim", cls.hidden_size))
            intermediate = int(width * d.get("mlp_ratio", 4))
            eps = 1e-6
        else:
            width = int(d.get("hidden_size", cls.hidden_size))
            intermediate = int(d.get("intermediate_size", 4 * width))
            eps = float(d.get("rms_norm_eps", cls.layer_norm_eps))
        rope = d.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", "axial")
        if rope_type != "axial":
            raise ValueError(f"vision rope_type {rope_type!r} is not supported (only 'axial')")
        patch = d.get("patch_size", cls.patch_size)
        if isinstance(patch, (list, tuple)):
            if len(set(patch)) != 1:
                raise ValueError(f"non-square vision patch_size {patch} is not supported")
            patch = patch[0]
        return cls(
            depth=int(d.get("depth", cls.depth)),
            hidden_size=width,
            intermediate_size=intermediate,
            num_heads=int(d.get("num_heads", d.get("num_attention_heads", cls.num_heads))),
            in_channels=int(d.get("in_channels", cls.in_channels)),
            patch_size=int(patch),
            spatial_merge_size=int(d.get("spatial_merge_size", cls.spatial_merge_size)),
            hidden_act=str(d.get("hidden_act", cls.hidden_act)),
            layer_norm_eps=eps,
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", cls.rope_theta))),
        )


@dataclass
class ResamplerConfig:
    vision_hidden_size: int = 1280
    text_hidden_size: int = 2560
    spatial_merge_size: int = 2
    temporal_merge_size: int = 2
    vision_layer_norm_eps: float = 1e-6
    text_rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.temporal_merge_size != 2:
            # The reference's frame pairing is hard-coded for 2 while temporal_linear's width follows the config.
            raise ValueError(f"temporal_merge_size {self.temporal_merge_size} is not supported (only 2)")

    @property
    def spatial_dim(self) -> int:
        return self.vision_hidden_size * self.spatial_merge_size**2

    @property
    def temporal_dim(self) -> int:
        return self.spatial_dim * self.temporal_merge_size

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ResamplerConfig:
        """Build from a whole (top-level) config dict: transformers' `ernie4_5_vl_moe` one (`vision_config` /
        `text_config` sub-dicts) or the published one (top-level `pixel_hidden_size`, `spatial_conv_size`,
        `temporal_conv_size`, `hidden_size`, `rms_norm_eps`)."""
        vision = d.get("vision_config") or {}
        if "text_config" in d or "temporal_merge_size" in vision:
            text = d.get("text_config") or {}
            vcfg = VisionConfig.from_hf_dict(vision)
            return cls(
                vision_hidden_size=vcfg.hidden_size,
                text_hidden_size=int(text.get("hidden_size", cls.text_hidden_size)),
                spatial_merge_size=vcfg.spatial_merge_size,
                temporal_merge_size=int(vision.get("temporal_merge_size", cls.temporal_merge_size)),
                vision_layer_norm_eps=vcfg.layer_norm_eps,
                text_rms_norm_eps=float(text.get("rms_norm_eps", cls.text_rms_norm_eps)),
            )
        return cls(
            vision_hidden_size=int(d.get("pixel_hidden_size", vision.get("embed_dim", cls.vision_hidden_size))),
            text_hidden_size=int(d.get("hidden_size", cls.text_hidden_size)),
            spatial_merge_size=int(d.get("spatial_conv_size", cls.spatial_merge_size)),
            temporal_merge_size=int(d.get("temporal_conv_size", cls.temporal_merge_size)),
            vision_layer_norm_eps=1e-6,
            text_rms_norm_eps=float(d.get("rms_norm_eps", cls.text_rms_norm_eps)),
        )


def resampler_key_from_published(key: str) -> str:
    """Map a published-checkpoint resampler key (`spatial_linear.0.weight`, ...) to this module's name."""
    for src, dst in ((".0.", ".fc1."), (".2.", ".fc2."), (".3.", ".ln.")):
        for part in ("spatial_linear", "temporal_linear"):
            key = key.replace(part + src, part + dst)
    return key


# ---- grid bookkeeping ------------------------------------------------------------------------------------------------
def check_vision_inputs(pixel_values_NK: torch.Tensor, grid_thw: torch.Tensor, patch_dim: int, merge: int) -> None:
    """Raise a ValueError naming the shapes when pixel_values and grid_thw disagree."""
    if grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape [num_images, 3], got {tuple(grid_thw.shape)}")
    if pixel_values_NK.ndim != 2 or pixel_values_NK.shape[1] != patch_dim:
        raise ValueError(
            f"pixel_values must have shape [num_patches, {patch_dim}] (in_channels·patch²), "
            f"got {tuple(pixel_values_NK.shape)}"
        )
    grid = grid_thw.tolist()
    expected = sum(t * h * w for t, h, w in grid)
    if pixel_values_NK.shape[0] != expected:
        raise ValueError(
            f"pixel_values has {pixel_values_NK.shape[0]} patches (shape {tuple(pixel_values_NK.shape)}) but "
            f"grid_thw {grid} describes sum(t·h·w) = {expected}"
        )
    for t, h, w in grid:
        if t < 1 or h % merge or w % merge:
            raise ValueError(f"grid_thw entry {[t, h, w]} needs t >= 1 and h, w divisible by merge size {merge}")


def vision_position_ids(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """[N, 2] (row, column) of every patch, in the processor's block-major order, repeated for each frame."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        blocks = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(blocks).transpose(1, 2).flatten()
        cols = cols.reshape(blocks).transpose(1, 2).flatten()
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out).to(grid_thw.device)


def frame_lengths(grid_thw: torch.Tensor) -> list[int]:
    """Attention segment lengths: one per frame (h·w patches), t of them per image/video."""
    return [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]


# ---- vision transformer ----------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.patch_dim, cfg.hidden_size, bias=False)

    def forward(self, pixel_values_NK: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values_NK.to(self.proj.weight.dtype))


class VisionRotaryEmbedding(nn.Module):
    """Axial 2D RoPE: the same Dh/4 frequencies for rows and columns; rotates the whole head (rotate-half)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        half = cfg.head_dim // 2
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions_N2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles_N2f = positions_N2[..., None].float() * self.inv_freq.float()
        angles_Nh = torch.cat([angles_N2f[:, 0], angles_N2f[:, 1]], dim=-1)
        angles_NDh = torch.cat([angles_Nh, angles_Nh], dim=-1)
        return angles_NDh.cos(), angles_NDh.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x_NHDh: torch.Tensor, cos_NDh: torch.Tensor, sin_NDh: torch.Tensor) -> torch.Tensor:
    dtype = x_NHDh.dtype
    x = x_NHDh.float()
    cos, sin = cos_NDh.unsqueeze(-2).float(), sin_NDh.unsqueeze(-2).float()
    return (x * cos + rotate_half(x) * sin).to(dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x_ND: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lengths: list[int]) -> torch.Tensor:
        n = x_ND.shape[0]
        q_NHDh, k_NHDh, v_NHDh = self.qkv(x_ND).reshape(n, 3, self.num_heads, -1).unbind(1)
        q_NHDh, k_NHDh = apply_rotary(q_NHDh, *rope), apply_rotary(k_NHDh, *rope)
        out = []
        # Attention never crosses a frame: one SDPA call per segment (no flash-attn varlen needed).
        for q, k, v in zip(*(t.split(lengths) for t in (q_NHDh, k_NHDh, v_NHDh))):
            o_HnDh = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
            out.append(o_HnDh.transpose(0, 1))
        return self.proj(torch.cat(out).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x_ND)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x_ND: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lengths: list[int]) -> torch.Tensor:
        x_ND = x_ND + self.attn(self.norm1(x_ND), rope, lengths)
        return x_ND + self.mlp(self.norm2(x_ND))


class VisionTransformer(nn.Module):
    """pixel_values [N, K] + grid_thw [I, 3] -> patch features [N, D] (after the final LayerNorm `ln`)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.rotary_pos_emb = VisionRotaryEmbedding(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values_NK: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        check_vision_inputs(pixel_values_NK, grid_thw, self.cfg.patch_dim, self.cfg.spatial_merge_size)
        lengths = frame_lengths(grid_thw)
        positions_N2 = vision_position_ids(grid_thw, self.cfg.spatial_merge_size).to(pixel_values_NK.device)
        rope = self.rotary_pos_emb(positions_N2)
        x_ND = self.patch_embed(pixel_values_NK)
        for block in self.blocks:
            x_ND = block(x_ND, rope, lengths)
        return self.ln(x_ND)


# ---- resampler -------------------------------------------------------------------------------------------------------
class ResamplerMLP(nn.Module):
    """Linear -> exact GELU -> Linear -> LayerNorm (the reference's `Ernie4_5_VLMoeVisionMLP`)."""

    def __init__(self, in_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.ln = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.fc2(F.gelu(self.fc1(x))))


def temporal_pair_index(grid_thw: torch.Tensor, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the [M, S] spatially merged tokens of the first / second frame of each temporal pair.

    Frames (0,1), (2,3), ... of every entry are paired; a single frame (t == 1, an image) pairs with itself and with
    odd t > 1 the last frame is left out, exactly as the reference's `_temporal_slicing`."""
    first, second = [], []
    offset = 0
    for t, h, w in grid_thw.tolist():
        per_frame = h * w // merge**2
        for a, b in zip(range(0, t, 2), range(1 if t > 1 else 0, t, 2)):
            first.append(torch.arange(offset + a * per_frame, offset + (a + 1) * per_frame))
            second.append(torch.arange(offset + b * per_frame, offset + (b + 1) * per_frame))
        offset += t * per_frame
    return torch.cat(first), torch.cat(second)


class VariableResolutionResampler(nn.Module):
    """Vision features [N, D] + grid_thw -> language-model embeddings [T, L].

    T = Σ per image h·w/merge² (t == 1) and Σ per video ⌊t/2⌋·h·w/merge²."""

    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        self.cfg = cfg
        self.spatial_linear = ResamplerMLP(cfg.spatial_dim, cfg.spatial_dim, cfg.vision_layer_norm_eps)
        self.temporal_linear = ResamplerMLP(cfg.temporal_dim, cfg.spatial_dim, cfg.vision_layer_norm_eps)
        self.mlp = nn.Linear(cfg.spatial_dim, cfg.text_hidden_size)
        self.after_norm = RMSNorm(cfg.text_hidden_size, cfg.text_rms_norm_eps)

    def forward(self, x_ND: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        merge = self.cfg.spatial_merge_size
        if grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"grid_thw must have shape [num_images, 3], got {tuple(grid_thw.shape)}")
        expected = int(grid_thw.prod(-1).sum())
        if x_ND.ndim != 2 or x_ND.shape != (expected, self.cfg.vision_hidden_size):
            raise ValueError(
                f"vision features must have shape [{expected}, {self.cfg.vision_hidden_size}] for grid_thw "
                f"{grid_thw.tolist()}, got {tuple(x_ND.shape)}"
            )
        # Consecutive merge² patches form one merge×merge block (the processor's block-major order).
        x_MS = self.spatial_linear(x_ND.reshape(-1, self.cfg.spatial_dim))
        first, second = (i.to(x_MS.device) for i in temporal_pair_index(grid_thw, merge))
        x_T2S = torch.cat([x_MS.index_select(0, first), x_MS.index_select(0, second)], dim=-1)
        x_TS = self.temporal_linear(x_T2S)
        return self.after_norm(self.mlp(x_TS))
