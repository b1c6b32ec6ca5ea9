"""Parameter accounting for ERNIE-4.5-VL configs (no weights needed), for published-size checks.

Counts are analytic from `ErnieVLConfig` and agree with `ErnieVLForConditionalGeneration`'s parameter count (tested on
the meta device). "active" is what one *text* token touches: embeddings, attention, norms, dense MLPs, the text router,
`moe_k` text experts, the shared experts and the head; the vision tower, resampler, vision routers and vision experts
are idle for text. "non_embedding" leaves out the input table (and an untied head), as `count_params` does for the
text models.
"""

from __future__ import annotations

from ernie_platform.models.flops import ParamCounts, attention_params, swiglu_params
from ernie_platform.models.vl.model import ErnieVLConfig


def count_vision_params(cfg: ErnieVLConfig) -> int:
    """Vision tower (ViT) + resampler parameters."""
    v, r = cfg.vision, cfg.resampler
    d, f = v.hidden_size, v.intermediate_size
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    vit = v.patch_dim * d + v.depth * block + 2 * d
    s, t, lm = r.spatial_dim, r.temporal_dim, r.text_hidden_size
    spatial = (s * s + s) + (s * s + s) + 2 * s
    temporal = (t * s + s) + (s * s + s) + 2 * s
    resampler = spatial + temporal + (s * lm + lm) + lm
    return vit + resampler


def count_vl_params(cfg: ErnieVLConfig) -> ParamCounts:
    """Total / active-per-text-token parameters of the VL model, with and without the embedding table."""
    a = cfg.text
    d = a.hidden_size
    head_dim = a.attention_args().resolved_head_dim
    attn = attention_params(d, head_dim, a.num_attention_heads, a.num_key_value_heads, a.use_bias)
    norms = 2 * d

    def swiglu(width: int, with_bias: bool) -> int:
        return swiglu_params(d, width, with_bias)

    f_text, f_vision = a.moe_intermediate_size
    e, k = a.moe_num_experts, a.moe_k
    total = active = 0
    for kind in a.mlp_layer_types:
        total += attn + norms
        active += attn + norms
        if kind == "sparse":
            shared = swiglu(f_text * a.moe_num_shared_experts, a.use_bias) if a.moe_num_shared_experts else 0
            text_pool = e * d + e * swiglu(f_text, False)
            vision_pool = e * d + e * swiglu(f_vision, False)
            total += text_pool + vision_pool + shared
            active += e * d + k * swiglu(f_text, False) + shared
        else:
            total += swiglu(a.intermediate_size, a.use_bias)
            active += swiglu(a.intermediate_size, a.use_bias)
    total += d  # final norm
    active += d
    total += count_vision_params(cfg)
    tied = cfg.tie_word_embeddings
    embedding = a.vocab_size * d + (0 if tied else a.vocab_size * d)
    return ParamCounts(
        total=total + embedding,
        active=active + embedding,
        embedding=embedding,
        total_non_embedding=total,
        active_non_embedding=active,
    )


__all__ = ["count_vision_params", "count_vl_params"]
