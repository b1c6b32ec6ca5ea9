"""ERNIE-4.5-VL (VL-28B-A3B, VL-424B-A47B): vision tower + resampler + M-RoPE heterogeneous-MoE language model.

`ErnieVLForConditionalGeneration.forward` takes the keyword arguments of transformers'
`Ernie4_5_VLMoeForConditionalGeneration.forward` (`input_ids`, `attention_mask`, `mm_token_type_ids`,
`moe_mm_token_type_ids`, `pixel_values`, `image_grid_thw`, `pixel_values_videos`, `video_grid_thw`) and returns an
output with `.logits`; module names mirror it (`model.language_model`, `model.vision_tower`, `model.resampler_model`,
`lm_head`; routed experts stacked per pool).

Image embeddings replace the embeddings of the `image_token_id` placeholders, in order. 3D positions (t, h, w): text
tokens count up by one on all axes; a vision block of grid (t, h/m, w/m) starts at the running position p and takes
positions (p + t_i, p + h_i, p + w_i); the running position then advances by max(h, w)/m. With a `KVCache`, the
prefill stores each row's offset (max position + 1 − tokens) and later tokens continue at slot + offset, so
incremental decoding after an image prompt equals the full forward.

Shape legend: B batch, T tokens, D text hidden, V vocab, I images.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ernie_platform.models.cache import KVCache
from ernie_platform.models.config import MoEConfig
from ernie_platform.models.ernie import init_weights, shift_for_next_token
from ernie_platform.models.moe import weighted_router_loss
from ernie_platform.models.vl.text import VLTextArgs, VLTextModel
from ernie_platform.models.vl.vision import (
    ResamplerConfig,
    VariableResolutionResampler,
    VisionConfig,
    VisionTransformer,
)


@dataclass
class ErnieVLConfig:
    text: VLTextArgs
    vision: VisionConfig
    resampler: ResamplerConfig
    image_token_id: int = 100295
    image_start_token_id: int = 101304
    image_end_token_id: int = 101305
    video_token_id: int = 103367
    video_start_token_id: int = 101306
    video_end_token_id: int = 101307
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ErnieVLConfig:
        """From a transformers `ernie4_5_vl_moe` config.json dict."""
        if d.get("model_type") not in (None, "ernie4_5_vl_moe"):
            raise ValueError(f"model_type={d.get('model_type')!r} is not ernie4_5_vl_moe")
        text_d, vision_d = dict(d.get("text_config") or {}), dict(d.get("vision_config") or {})
        text = VLTextArgs.from_hf_dict(text_d)
        vision = VisionConfig.from_hf_dict(vision_d)
        resampler = ResamplerConfig.from_hf_dict({**d, "vision_config": vision_d, "text_config": text_d})
        keys = ("image_token_id", "image_start_token_id", "image_end_token_id", "video_token_id",
                "video_start_token_id", "video_end_token_id", "tie_word_embeddings")
        return cls(text, vision, resampler, **{k: d[k] for k in keys if k in d})


@dataclass
class ErnieVLOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None  # what to backpropagate: LM loss (token-balanced if asked) + router_loss
    lm_loss: Optional[torch.Tensor] = None  # per-token mean next-token cross-entropy (the value to log)
    router_loss: Optional[torch.Tensor] = None  # coefficient-weighted sum over both modalities (training only)
    router_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # "text/z", …: mean over MoE layers
    position_ids: Optional[torch.Tensor] = None  # the [3, B, T] positions used


def token_balanced_lm_loss(
    logits_BTV: torch.Tensor, labels_BT: torch.Tensor, token_budget: Optional[int] = None, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, per-token mean to log) of next-token prediction.

    ERNIE's multimodal token-balanced loss: with `token_budget`, the summed loss is divided by that fixed number
    instead of the batch's count of loss tokens, so every loss token weighs the same whatever the batch holds (a batch
    whose image tokens leave few text targets no longer scales its text tokens up). Without it, both are the mean.
    """
    shift_logits, shift_labels = shift_for_next_token(logits_BTV, labels_BT)
    per_token = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction="none")
    n = (shift_labels != ignore_index).sum()
    mean = per_token.sum() / n.clamp(min=1)
    if token_budget is None:
        return mean, mean
    if token_budget <= 0:
        raise ValueError(f"token_budget={token_budget} must be positive")
    return per_token.sum() / token_budget, mean


class ErnieVLModel(nn.Module):
    def __init__(self, cfg: ErnieVLConfig, backend: str = "torch"):
        super().__init__()
        self.language_model = VLTextModel(cfg.text, backend)
        self.vision_tower = VisionTransformer(cfg.vision)
        self.resampler_model = VariableResolutionResampler(cfg.resampler)


class ErnieVLForConditionalGeneration(nn.Module):
    def __init__(self, cfg: ErnieVLConfig, backend: Optional[str] = None, moe_cfg: Optional[MoEConfig] = None):
        super().__init__()
        self.cfg = cfg
        self.moe_cfg = moe_cfg or MoEConfig()
        self.model = ErnieVLModel(cfg, backend or self.moe_cfg.backend)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight
        init_weights(self)  # expert pools are created with torch.empty

    @property
    def args(self) -> Any:
        """The language model's shapes as `ErnieModelArgs` (layers, KV heads, head dim, vocabulary), what the KV
        cache and the inference engine read from a text model's `args`."""
        return self.cfg.text.attention_args()

    # ---- positions ---------------------------------------------------------------------------------------------------
    def get_rope_index(
        self,
        input_ids: torch.Tensor,
        mm_token_type_ids: torch.Tensor,
        image_grid_thw: Optional[torch.Tensor] = None,
        video_grid_thw: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """3D positions [3, B, T] and each row's offset [B] (max position + 1 − real tokens)."""
        merge = self.cfg.vision.spatial_merge_size
        t_merge = self.cfg.resampler.temporal_merge_size
        b, t = input_ids.shape
        pos_3BT = torch.zeros(3, b, t, dtype=torch.long, device=input_ids.device)
        grids = {1: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
                 2: iter(video_grid_thw.tolist() if video_grid_thw is not None else [])}
        deltas = []
        for row in range(b):
            keep = attention_mask[row].bool() if attention_mask is not None else torch.ones(t, dtype=torch.bool)
            types = mm_token_type_ids[row][keep.to(mm_token_type_ids.device)].tolist()
            parts, cur = [], 0
            for kind, group in itertools.groupby(range(len(types)), key=lambda i: types[i]):
                n = len(list(group))
                if kind == 0:
                    parts.append(torch.arange(n).view(1, -1).expand(3, -1) + cur)
                    cur += n
                    continue
                try:
                    gt, gh, gw = next(grids[kind])
                except StopIteration:
                    raise ValueError(f"row {row}: more {'image' if kind == 1 else 'video'} blocks in "
                                     "mm_token_type_ids than entries in the grid_thw") from None
                lt, lh, lw = gt // (1 if kind == 1 else t_merge), gh // merge, gw // merge
                if lt * lh * lw != n:
                    raise ValueError(f"row {row}: a vision block of {n} tokens does not match grid {[gt, gh, gw]} "
                                     f"(expects {lt * lh * lw})")
                tt, hh, ww = torch.meshgrid(torch.arange(lt), torch.arange(lh), torch.arange(lw), indexing="ij")
                parts.append(torch.stack([tt, hh, ww]).reshape(3, -1) + cur)
                cur += max(gh, gw) // merge
            positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
            pos_3BT[:, row, keep.to(pos_3BT.device)] = positions.to(pos_3BT.device)
            deltas.append((int(positions.max()) + 1 - len(types)) if len(types) else 0)
        return pos_3BT, torch.tensor(deltas, dtype=torch.long, device=input_ids.device)

    # ---- forward -----------------------------------------------------------------------------------------------------
    def embed_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        features = self.model.vision_tower(pixel_values, grid_thw)
        return self.model.resampler_model(features, grid_thw)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        mm_token_type_ids: Optional[torch.Tensor] = None,
        moe_mm_token_type_ids: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        pixel_values_videos: Optional[torch.Tensor] = None,
        video_grid_thw: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        logits_to_keep: int = 0,
        token_budget: Optional[int] = None,
    ) -> ErnieVLOutput:
        """`token_budget`: normalise the LM loss's gradient by this fixed token count (see token_balanced_lm_loss)."""
        lm = self.model.language_model
        x_BTD = lm.embed_tokens(input_ids)
        for values, grid, token_id, what in (
            (pixel_values, image_grid_thw, self.cfg.image_token_id, "image"),
            (pixel_values_videos, video_grid_thw, self.cfg.video_token_id, "video"),
        ):
            if values is None:
                continue
            if grid is None:
                raise ValueError(f"{what} pixel values given without {what}_grid_thw")
            embeds = self.embed_vision(values, grid).to(x_BTD.dtype)
            slots = input_ids == token_id
            if int(slots.sum()) != embeds.shape[0]:
                raise ValueError(
                    f"{int(slots.sum())} {what} placeholder tokens (id {token_id}) in input_ids but {embeds.shape[0]} "
                    f"{what} embeddings from {what}_grid_thw {grid.tolist()}"
                )
            x_BTD = x_BTD.masked_scatter(slots.unsqueeze(-1), embeds)

        has_vision = image_grid_thw is not None or video_grid_thw is not None
        if position_ids is None:
            first_chunk = cache is None or int(cache.lengths_B.max()) == 0
            if has_vision and mm_token_type_ids is None:
                raise ValueError("image/video inputs need mm_token_type_ids to compute the 3D positions")
            if has_vision and first_chunk:
                position_ids, deltas_B = self.get_rope_index(
                    input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask
                )
                if cache is not None:
                    cache.rope_deltas_B = deltas_B
            elif cache is not None:
                deltas_B = getattr(cache, "rope_deltas_B", None)
                slots_BT = cache.lengths_B.unsqueeze(1) + torch.arange(input_ids.shape[1], device=input_ids.device)
                if deltas_B is not None:
                    slots_BT = slots_BT + deltas_B.unsqueeze(1)
                position_ids = slots_BT
        hidden = lm(
            inputs_embeds=x_BTD,
            attention_mask=attention_mask,
            position_ids=position_ids,
            moe_mm_token_type_ids=moe_mm_token_type_ids,
            cache=cache,
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        out = ErnieVLOutput(logits=self.lm_head(hidden), position_ids=position_ids)
        blocks = [layer.mlp for layer in lm.layers if hasattr(layer.mlp, "last_router_losses")]
        names = sorted({k for blk in blocks for k in blk.last_router_losses})
        out.router_losses = {
            k: torch.stack([blk.last_router_losses[k] for blk in blocks if k in blk.last_router_losses]).mean()
            for k in names
        }
        if out.router_losses:
            out.router_loss = weighted_router_loss(out.router_losses, self.moe_cfg)
        if labels is not None:
            loss, out.lm_loss = token_balanced_lm_loss(out.logits, labels, token_budget)
            out.loss = loss if out.router_loss is None else loss + out.router_loss
        return out
