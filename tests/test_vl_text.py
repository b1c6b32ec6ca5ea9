"""The VL language model (M-RoPE + heterogeneous MoE) equals transformers' Ernie4_5_VLMoeTextModel."""

from __future__ import annotations

import pytest
import torch
from transformers.models.ernie4_5_vl_moe.configuration_ernie4_5_vl_moe import Ernie4_5_VLMoeTextConfig
from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeTextModel

from ernie_platform.models import KVCache
from ernie_platform.models.vl.text import VLTextArgs, VLTextModel

TOL = 1e-4
CFG = dict(
    vocab_size=90, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, moe_num_experts=4, moe_k=2, moe_intermediate_size=[24, 12],
    moe_num_shared_experts=1, mlp_layer_types=["dense", "sparse", "sparse"],
)
MROPE = [3, 3, 2]  # head_dim 16 → 8 rotary pairs


def load_from_reference(ref: torch.nn.Module, args: VLTextArgs) -> VLTextModel:
    ours = VLTextModel(args)
    sd = {}
    for k, v in ref.state_dict().items():
        k = k.replace("gate.moe_statics.e_score_correction_bias", "gate.e_score_correction_bias")
        k = k.replace("_moe.experts.gate_up_proj", "_moe.w13_E2FD").replace("_moe.experts.down_proj", "_moe.w2_EDF")
        sd[k] = v
    ours.load_state_dict(sd, strict=True)
    return ours.eval()


@pytest.fixture()
def pair() -> tuple[torch.nn.Module, VLTextModel]:
    cfg = Ernie4_5_VLMoeTextConfig(**CFG, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "mrope_section": MROPE})
    ref = Ernie4_5_VLMoeTextModel(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "e_score_correction_bias" in name:
                p.normal_(0, 0.05)
    args = VLTextArgs.from_hf_dict(cfg.to_dict())
    assert args.mrope_section == MROPE and args.rope_theta == 10000.0
    return ref, load_from_reference(ref, args)


def _mm_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows: text, a 2x3 'image' block of vision tokens, text; 3D positions as the processor would give."""
    ids = torch.randint(3, 90, (2, 12))
    types = torch.zeros(2, 12, dtype=torch.long)
    types[:, 3:9] = 1
    pos = torch.zeros(3, 2, 12, dtype=torch.long)
    text = torch.arange(3)
    pos[:, :, :3] = text
    hh, ww = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
    pos[0, :, 3:9] = 3
    pos[1, :, 3:9] = 3 + hh.reshape(-1)
    pos[2, :, 3:9] = 3 + ww.reshape(-1)
    pos[:, :, 9:] = 6 + torch.arange(3)
    return ids, types, pos


def test_text_only_matches(pair) -> None:
    ref, ours = pair
    ids = torch.randint(3, 90, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(input_ids=ids).last_hidden_state, rtol=0, atol=TOL)


def test_multimodal_positions_and_experts_match(pair) -> None:
    ref, ours = pair
    ids, types, pos = _mm_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, position_ids=pos, moe_mm_token_type_ids=types).last_hidden_state
        got = ours(ids, position_ids=pos, moe_mm_token_type_ids=types)
        torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
        # the 3D positions matter: flattening them to 1D changes the result
        assert (ours(ids, moe_mm_token_type_ids=types) - expected).abs().max() > 1e-3


def test_incremental_decoding_after_image_prompt_continues_3d_positions(pair) -> None:
    _, ours = pair
    ids, types, pos = _mm_batch()
    extra = torch.randint(3, 90, (2, 3))
    full_ids = torch.cat([ids, extra], dim=1)
    full_types = torch.cat([types, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    nxt = pos[:, :, -1:].max() + 1 + torch.arange(3)  # text after the prompt continues from max position + 1
    full_pos = torch.cat([pos, nxt.view(1, 1, 3).expand(3, 2, 3)], dim=2)
    with torch.no_grad():
        full = ours(full_ids, position_ids=full_pos, moe_mm_token_type_ids=full_types)
        cache = KVCache(3, 2, 2, 16, max_seq_len=16)
        prefill = ours(ids, position_ids=pos, moe_mm_token_type_ids=types, cache=cache)
        torch.testing.assert_close(prefill, full[:, :12], rtol=0, atol=1e-5)
        for i in range(3):
            step = ours(extra[:, i : i + 1], position_ids=full_pos[:, :, 12 + i : 13 + i],
                        moe_mm_token_type_ids=torch.zeros(2, 1, dtype=torch.long), cache=cache)
            torch.testing.assert_close(step[:, 0], full[:, 12 + i], rtol=0, atol=1e-5)


def test_bad_config_and_positions_are_clear_errors(pair) -> None:
    _, ours = pair
    with pytest.raises(ValueError, match=r"position_ids must be \[3, B, T\]"):
        ours(torch.randint(3, 90, (2, 4)), position_ids=torch.zeros(2, 2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="mrope_section"):
        VLTextArgs(**{**CFG, "mrope_section": [4, 2, 2]})
    with pytest.raises(ValueError, match="mlp_layer_types"):
        VLTextArgs(**{**CFG, "mlp_layer_types": ["dense", "sparse"]})
