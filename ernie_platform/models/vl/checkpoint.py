"""ERNIE-4.5-VL checkpoints in transformers' on-disk layout (what `Ernie4_5_VLMoeForConditionalGeneration`
writes and the published `baidu/ERNIE-4.5-VL-*` checkpoints use), safetensors only.

On disk vs in memory (N = layer, E = experts per pool):
    model.{embed_tokens,layers.N.*,norm}                 model.language_model.{…}
    model.layers.N.mlp.experts.{0..E-1}.*_proj           text_moe.w13_E2FD / w2_EDF (gate ‖ up stacked)
    model.layers.N.mlp.experts.{E..2E-1}.*_proj          vision_moe.w13_E2FD / w2_EDF
    model.layers.N.mlp.gate.weight / gate.weight_1 [D,E] text_moe / vision_moe .gate.weight [E, D] (transposed)
    model.layers.N.mlp.moe_statics.e_score_correction_bias [2, E]
                                                         {text,vision}_moe.gate.e_score_correction_bias [1, E]
    model.vision_model.*                                 model.vision_tower.*
    model.resampler_model.{spatial,temporal}_linear.{0,2,3}.*   ….{fc1,fc2,ln}.*
    lm_head.weight (absent when tied)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import torch

from ernie_platform.models.vl.model import ErnieVLConfig, ErnieVLForConditionalGeneration
from ernie_platform.models.vl.vision import resampler_key_from_published

_POOL = re.compile(r"^model\.language_model\.layers\.(\d+)\.mlp\.(text|vision)_moe\.(.+)$")
_PUBLISHED_RESAMPLER = {"fc1": "0", "fc2": "2", "ln": "3"}


def vl_hf_state_dict(model: ErnieVLForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The model's tensors under the on-disk names."""
    sd = model.state_dict()
    num_experts = model.cfg.text.moe_num_experts
    out: dict[str, torch.Tensor] = {}
    biases: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in sd.items():
        t = t.detach()
        if name == "lm_head.weight" and model.cfg.tie_word_embeddings:
            continue
        m = _POOL.match(name)
        if m:
            layer, pool, rest = m.groups()
            prefix = f"model.layers.{layer}.mlp"
            offset = 0 if pool == "text" else num_experts
            if rest == "gate.weight":
                out[f"{prefix}.gate.weight{'' if pool == 'text' else '_1'}"] = t.T.contiguous()
            elif rest == "gate.e_score_correction_bias":
                biases.setdefault(prefix, {})[pool] = t
            elif rest == "w13_E2FD":
                f = t.shape[1] // 2
                for e in range(t.shape[0]):
                    out[f"{prefix}.experts.{offset + e}.gate_proj.weight"] = t[e, :f].contiguous()
                    out[f"{prefix}.experts.{offset + e}.up_proj.weight"] = t[e, f:].contiguous()
            elif rest == "w2_EDF":
                for e in range(t.shape[0]):
                    out[f"{prefix}.experts.{offset + e}.down_proj.weight"] = t[e].contiguous()
            else:
                raise KeyError(f"unmapped VL MoE tensor {name}")
            continue
        if name.startswith("model.language_model."):
            key = "model." + name[len("model.language_model.") :]
        elif name.startswith("model.vision_tower."):
            key = "model.vision_model." + name[len("model.vision_tower.") :]
        elif name.startswith("model.resampler_model."):
            key = name
            for ours, disk in _PUBLISHED_RESAMPLER.items():
                key = key.replace(f"_linear.{ours}.", f"_linear.{disk}.")
        else:
            key = name
        out[key] = t.clone().contiguous()
    for prefix, pools in biases.items():
        out[f"{prefix}.moe_statics.e_score_correction_bias"] = torch.cat([pools["text"], pools["vision"]], 0)
    return out


def vl_state_dict_from_hf(tensors: dict[str, torch.Tensor], model: ErnieVLForConditionalGeneration) -> dict:
    """Inverse of `vl_hf_state_dict` for a model of the same config (missing/unexpected keys are the caller's)."""
    num_experts = model.cfg.text.moe_num_experts
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, dict[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = re.match(r"^model\.layers\.(\d+)\.mlp\.(gate\.weight(?:_1)?|moe_statics\.e_score_correction_bias|"
                     r"experts\.(\d+)\.(gate|up|down)_proj\.weight)$", key)
        if m:
            prefix = f"model.language_model.layers.{m.group(1)}.mlp"
            if m.group(2) == "gate.weight":
                out[f"{prefix}.text_moe.gate.weight"] = t.T
            elif m.group(2) == "gate.weight_1":
                out[f"{prefix}.vision_moe.gate.weight"] = t.T
            elif m.group(2).startswith("moe_statics"):
                out[f"{prefix}.text_moe.gate.e_score_correction_bias"] = t[0:1]
                out[f"{prefix}.vision_moe.gate.e_score_correction_bias"] = t[1:2]
            else:
                e = int(m.group(3))
                pool = "text" if e < num_experts else "vision"
                experts.setdefault((prefix, pool), {}).setdefault(e % num_experts, {})[m.group(4)] = t
            continue
        if key.startswith("model.vision_model."):
            name = "model.vision_tower." + key[len("model.vision_model.") :]
        elif key.startswith("model.resampler_model."):
            name = resampler_key_from_published(key)
        elif key.startswith("model.") and not key.startswith(("model.vision_tower.", "model.language_model.")):
            name = "model.language_model." + key[len("model.") :]
        else:
            name = key
        out[name] = t
    for (prefix, pool), by_expert in experts.items():
        w13 = target.get(f"{prefix}.{pool}_moe.w13_E2FD")
        if w13 is None:
            continue
        e_count = w13.shape[0]
        missing = [(e, p) for e in range(e_count) for p in ("gate", "up", "down") if p not in by_expert.get(e, {})]
        if missing:
            e, p = missing[0]
            layer = prefix.split(".")[3]
            idx = e + (0 if pool == "text" else num_experts)
            raise KeyError(f"missing tensor model.layers.{layer}.mlp.experts.{idx}.{p}_proj.weight")
        out[f"{prefix}.{pool}_moe.w13_E2FD"] = torch.stack(
            [torch.cat([by_expert[e]["gate"], by_expert[e]["up"]], 0) for e in range(e_count)]
        )
        out[f"{prefix}.{pool}_moe.w2_EDF"] = torch.stack([by_expert[e]["down"] for e in range(e_count)])
    if model.cfg.tie_word_embeddings and "model.language_model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.language_model.embed_tokens.weight"]  # the same (tied) parameter
    return out


def vl_config_to_hf(cfg: ErnieVLConfig) -> dict[str, Any]:
    t, v = cfg.text, cfg.vision
    text_config = {
        "model_type": "ernie4_5_vl_moe_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps, "use_bias": t.use_bias, "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section)},
        "moe_num_experts": t.moe_num_experts, "moe_k": t.moe_k, "moe_intermediate_size": list(t.moe_intermediate_size),
        "moe_num_shared_experts": t.moe_num_shared_experts, "moe_norm_min": t.moe_norm_min,
        "mlp_layer_types": list(t.mlp_layer_types), "pad_token_id": t.pad_token_id, "hidden_act": "silu",
    }
    if t.head_dim is not None:
        text_config["head_dim"] = t.head_dim
    vision_config = {
        "model_type": "ernie4_5_vl_moe_vision", "depth": v.depth, "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "in_channels": v.in_channels,
        "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size, "hidden_act": v.hidden_act,
        "rms_norm_eps": v.layer_norm_eps, "temporal_merge_size": cfg.resampler.temporal_merge_size,
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }
    return {
        "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"], "model_type": "ernie4_5_vl_moe",
        "text_config": text_config, "vision_config": vision_config, "tie_word_embeddings": cfg.tie_word_embeddings,
        "image_token_id": cfg.image_token_id, "image_start_token_id": cfg.image_start_token_id,
        "image_end_token_id": cfg.image_end_token_id, "video_token_id": cfg.video_token_id,
        "video_start_token_id": cfg.video_start_token_id, "video_end_token_id": cfg.video_end_token_id,
    }


def load_vl_pretrained(
    path: Path, hf_cfg: dict[str, Any], tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: Any,
    backend: Optional[str] = None,
) -> ErnieVLForConditionalGeneration:
    from ernie_platform.models.checkpoint import CheckpointError, cast_model, check_keys

    cfg = ErnieVLConfig.from_hf_dict(hf_cfg)
    with torch.device(device):
        model = ErnieVLForConditionalGeneration(cfg, backend or "torch")
    expected = vl_hf_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    check_keys(path, missing, unexpected)
    for key, t in tensors.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{path}: tensor {key} has shape {list(t.shape)} but the model expects {list(expected[key].shape)}"
            )
    model.load_state_dict(vl_state_dict_from_hf(tensors, model), strict=True)
    return cast_model(model, dtype).eval()


def vl_config_json(model: ErnieVLForConditionalGeneration) -> str:
    cfg = vl_config_to_hf(model.cfg)
    cfg["dtype"] = str(model.model.language_model.embed_tokens.weight.dtype).replace("torch.", "")
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"
