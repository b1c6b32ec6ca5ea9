"""The full VL model equals transformers' Ernie4_5_VLMoeForConditionalGeneration on an image prompt."""

from __future__ import annotations

import pytest
import torch
from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

from ernie_platform.models import KVCache
from ernie_platform.models.vl.model import ErnieVLConfig, ErnieVLForConditionalGeneration

IMG, IMG_START, IMG_END = 60, 61, 62
TOL = 1e-4


def _hf_config() -> Ernie4_5_VLMoeConfig:
    return Ernie4_5_VLMoeConfig(
        vision_config=dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=64, patch_size=14,
                           spatial_merge_size=2, temporal_merge_size=2),
        text_config=dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=64, moe_intermediate_size=[16, 8], moe_num_experts=4,
                         moe_k=2, moe_num_shared_experts=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]}),
        image_token_id=IMG, image_start_token_id=IMG_START, image_end_token_id=IMG_END,
        video_token_id=59, video_start_token_id=57, video_end_token_id=58,
    )


@pytest.fixture(scope="module")
def pair():
    return make_pair()


def make_pair() -> tuple[Ernie4_5_VLMoeForConditionalGeneration, ErnieVLForConditionalGeneration]:
    """transformers' tiny VL model with random weights, and ours loaded with the same weights (both eval)."""
    torch.manual_seed(0)
    hf_cfg = _hf_config()
    ref = Ernie4_5_VLMoeForConditionalGeneration(hf_cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            scale = 0.05 if "e_score_correction_bias" in name else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.ndim == 1 and "bias" not in name else 0.0))
    ours = ErnieVLForConditionalGeneration(ErnieVLConfig.from_hf_dict(hf_cfg.to_dict()))
    sd = {}
    for k, v in ref.state_dict().items():
        k = k.replace("gate.moe_statics.e_score_correction_bias", "gate.e_score_correction_bias")
        k = k.replace("_moe.experts.gate_up_proj", "_moe.w13_E2FD").replace("_moe.experts.down_proj", "_moe.w2_EDF")
        sd[k] = v
    ours.load_state_dict(sd, strict=True)
    return ref, ours.eval()


def _prompt(grid: list[int], before: int = 3, after: int = 4) -> dict[str, torch.Tensor]:
    """text, <IMG_START>, placeholders, <IMG_END>, text; token types as the processor makes them."""
    n = grid[0] * grid[1] * grid[2] // 4
    g = torch.Generator().manual_seed(2)
    ids = torch.cat([torch.randint(3, 50, (before,), generator=g), torch.tensor([IMG_START]),
                     torch.full((n,), IMG), torch.tensor([IMG_END]), torch.randint(3, 50, (after,), generator=g)])
    mm = (ids == IMG).long()
    moe_mm = ((ids == IMG) | (ids == IMG_START) | (ids == IMG_END)).long()
    pixels = torch.randn(grid[0] * grid[1] * grid[2], 3 * 14 * 14, generator=g)
    return dict(input_ids=ids[None], mm_token_type_ids=mm[None], moe_mm_token_type_ids=moe_mm[None],
                pixel_values=pixels, image_grid_thw=torch.tensor([grid]))


@pytest.mark.parametrize("grid", [[1, 4, 6], [1, 6, 4]])
def test_image_prompt_logits_match(pair, grid: list[int]) -> None:
    ref, ours = pair
    inputs = _prompt(grid)
    with torch.no_grad():
        expected = ref(**inputs).logits
        out = ours(**inputs)
    assert out.logits.shape == expected.shape
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=TOL)
    pos_ref, _ = ref.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    assert torch.equal(out.position_ids, pos_ref)


def test_decoding_after_image_prompt_equals_full_forward(pair) -> None:
    _, ours = pair
    inputs = _prompt([1, 4, 6])
    extra = torch.tensor([[7, 8, 9]])
    full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], extra], 1),
            "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1),
            "moe_mm_token_type_ids": torch.cat([inputs["moe_mm_token_type_ids"], torch.zeros_like(extra)], 1)}
    with torch.no_grad():
        expected = ours(**full).logits
        a = ours.cfg.text
        cache = KVCache(a.num_hidden_layers, 1, a.num_key_value_heads, a.attention_args().resolved_head_dim, 32)
        prefill = ours(**inputs, cache=cache).logits
        torch.testing.assert_close(prefill, expected[:, : prefill.shape[1]], rtol=0, atol=1e-5)
        for i in range(extra.shape[1]):
            step = ours(extra[:, i : i + 1], mm_token_type_ids=torch.zeros(1, 1, dtype=torch.long),
                        moe_mm_token_type_ids=torch.zeros(1, 1, dtype=torch.long), cache=cache).logits
            torch.testing.assert_close(step[:, 0], expected[:, prefill.shape[1] + i], rtol=0, atol=1e-5)


def test_placeholder_count_mismatch_is_a_clear_error(pair) -> None:
    _, ours = pair
    inputs = _prompt([1, 4, 6])
    inputs["image_grid_thw"] = torch.tensor([[1, 4, 4]])
    inputs["pixel_values"] = inputs["pixel_values"][:16]
    with pytest.raises(ValueError, match=r"6 image placeholder tokens \(id 60\) in input_ids but 4 image embeddings"):
        ours(**inputs)


def test_load_transformers_checkpoint_and_save_back(pair, tmp_path) -> None:
    from transformers import AutoModelForImageTextToText

    from ernie_platform.models import load_pretrained, save_pretrained

    ref, _ = pair
    ref.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    assert isinstance(ours, ErnieVLForConditionalGeneration)
    inputs = _prompt([1, 4, 6])
    text_only = torch.randint(3, 50, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, ref(**inputs).logits, rtol=0, atol=TOL)
        torch.testing.assert_close(ours(text_only).logits, ref(input_ids=text_only).logits, rtol=0, atol=TOL)
    save_pretrained(ours, tmp_path / "ours")
    back = AutoModelForImageTextToText.from_pretrained(tmp_path / "ours").eval()
    assert type(back).__name__ == "Ernie4_5_VLMoeForConditionalGeneration"
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, ref(**inputs).logits, rtol=0, atol=TOL)
    again = load_pretrained(tmp_path / "ours")
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_vl_checkpoint_errors_name_the_tensor(pair, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from ernie_platform.models import CheckpointError, load_pretrained

    ref, _ = pair
    ref.save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(f))
    tensors.pop("model.layers.1.mlp.experts.5.up_proj.weight")
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.mlp.experts.5.up_proj.weight'\]"):
        load_pretrained(tmp_path / "hf")


def test_batch_mixing_image_prompt_and_text_only_prompt(pair) -> None:
    ref, ours = pair
    img = _prompt([1, 4, 6])
    length = img["input_ids"].shape[1]
    text = torch.zeros(1, length, dtype=torch.long)
    text[0, :5] = torch.randint(3, 50, (5,))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, 5:] = 0  # the text-only row is right-padded
    batch = dict(
        input_ids=torch.cat([img["input_ids"], text]),
        attention_mask=mask,
        mm_token_type_ids=torch.cat([img["mm_token_type_ids"], torch.zeros_like(text)]),
        moe_mm_token_type_ids=torch.cat([img["moe_mm_token_type_ids"], torch.zeros_like(text)]),
        pixel_values=img["pixel_values"],
        image_grid_thw=img["image_grid_thw"],
    )
    with torch.no_grad():
        expected = ref(**batch).logits
        got = ours(**batch).logits
        alone = ours(text[:, :5]).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=TOL)
    torch.testing.assert_close(got[1, :5], alone[0], rtol=0, atol=1e-5)  # batching does not change a row
