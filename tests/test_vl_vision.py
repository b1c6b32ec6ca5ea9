"""Parity of `ernie_platform.models.vl.vision` with transformers' ERNIE-4.5-VL vision tower and resampler (fp32)."""

from __future__ import annotations

import pytest
import torch

from ernie_platform.models.vl.vision import (
    ResamplerConfig,
    VariableResolutionResampler,
    VisionConfig,
    VisionTransformer,
    resampler_key_from_published,
)

hf_vl = pytest.importorskip("transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe")
from transformers import Ernie4_5_VLMoeConfig  # noqa: E402

ATOL = 1e-5


def _tiny_hf_config() -> Ernie4_5_VLMoeConfig:
    return Ernie4_5_VLMoeConfig(
        vision_config=dict(
            depth=2,
            hidden_size=32,
            num_heads=4,
            intermediate_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_merge_size=2,
        ),
        text_config=dict(
            hidden_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=64,
            moe_intermediate_size=[16, 8],
            moe_num_experts=2,
            moe_k=1,
        ),
    )


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values for every parameter (norm weights/biases included) so the comparison means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf_cfg = _tiny_hf_config()
    ref_vit = hf_vl.Ernie4_5_VLMoeVisionTransformerPretrainedModel._from_config(hf_cfg.vision_config).eval()
    ref_res = hf_vl.Ernie4_5_VLMoeVariableResolutionResamplerModel(hf_cfg).eval()
    _randomize(ref_vit, 1)
    _randomize(ref_res, 2)

    cfg_dict = hf_cfg.to_dict()
    vit = VisionTransformer(VisionConfig.from_hf_dict(cfg_dict["vision_config"])).eval()
    res = VariableResolutionResampler(ResamplerConfig.from_hf_dict(cfg_dict)).eval()
    vit.load_state_dict(ref_vit.state_dict(), strict=True)
    res.load_state_dict(ref_res.state_dict(), strict=True)
    return ref_vit, ref_res, vit, res


def _inputs(grids: list[list[int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    grid_thw = torch.tensor(grids, dtype=torch.long)
    n = int(grid_thw.prod(-1).sum())
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3 * 14 * 14, generator=g), grid_thw


GRIDS = {
    "one_image": [[1, 4, 4]],
    "two_images_different_sizes": [[1, 4, 6], [1, 2, 2]],
    "non_square": [[1, 2, 8], [1, 6, 4]],
    "video_and_image": [[4, 2, 4], [1, 4, 2]],
    "odd_frames": [[3, 2, 2]],
}


@pytest.mark.parametrize("name", list(GRIDS))
def test_forward_matches_reference(pair, name):
    ref_vit, ref_res, vit, res = pair
    pixel_values, grid_thw = _inputs(GRIDS[name])
    with torch.no_grad():
        ref_feat = ref_vit(pixel_values, grid_thw).last_hidden_state
        ref_out = ref_res(ref_feat, grid_thw)
        feat = vit(pixel_values, grid_thw)
        out = res(feat, grid_thw)
    assert feat.shape == ref_feat.shape
    torch.testing.assert_close(feat, ref_feat, atol=ATOL, rtol=0)
    assert out.shape == ref_out.shape == (ref_out.shape[0], 48)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)


def test_attention_is_per_image(pair):
    """Changing the second image must not move the first image's features."""
    _, _, vit, _ = pair
    pixel_values, grid_thw = _inputs(GRIDS["two_images_different_sizes"])
    n0 = 4 * 6
    other = pixel_values.clone()
    other[n0:] += 1.0
    with torch.no_grad():
        a, b = vit(pixel_values, grid_thw), vit(other, grid_thw)
    torch.testing.assert_close(a[:n0], b[:n0], atol=0, rtol=0)
    assert not torch.allclose(a[n0:], b[n0:])


def test_gradients_match_reference(pair):
    ref_vit, ref_res, vit, res = pair
    pixel_values, grid_thw = _inputs(GRIDS["non_square"], seed=3)
    x_ref = pixel_values.clone().requires_grad_(True)
    x_our = pixel_values.clone().requires_grad_(True)
    g = torch.Generator().manual_seed(4)
    ref_out = ref_res(ref_vit(x_ref, grid_thw).last_hidden_state, grid_thw)
    weights = torch.randn(ref_out.shape, generator=g)
    (ref_out * weights).sum().backward()
    (res(vit(x_our, grid_thw), grid_thw) * weights).sum().backward()
    torch.testing.assert_close(x_our.grad, x_ref.grad, atol=ATOL, rtol=0)
    ref_params = dict(ref_vit.named_parameters())
    for name, p in vit.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-4, rtol=1e-4)
    ref_vit.zero_grad(), ref_res.zero_grad(), vit.zero_grad(), res.zero_grad()


def test_mismatched_inputs_raise(pair):
    _, _, vit, res = pair
    pixel_values, grid_thw = _inputs([[1, 4, 4]])
    with pytest.raises(ValueError, match=r"\(15, 588\).*\[\[1, 4, 4\]\].*16"):
        vit(pixel_values[:15], grid_thw)
    with pytest.raises(ValueError, match=r"\[num_patches, 588\].*\(16, 587\)"):
        vit(pixel_values[:, :587], grid_thw)
    with pytest.raises(ValueError, match=r"\[num_images, 3\].*\(3,\)"):
        vit(pixel_values, grid_thw[0])
    with pytest.raises(ValueError, match=r"\[1, 3, 4\].*divisible"):
        vit(torch.randn(12, 588), torch.tensor([[1, 3, 4]]))
    with pytest.raises(ValueError, match=r"\[16, 32\].*\(16, 31\)"):
        res(torch.randn(16, 31), grid_thw)


def test_configs_from_published_layout():
    published = {
        "hidden_size": 48,
        "rms_norm_eps": 1e-5,
        "pixel_hidden_size": 32,
        "spatial_conv_size": 2,
        "temporal_conv_size": 2,
        "vision_config": {
            "model_type": "DFNRope_vision_transformer",
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 3584,
            "mlp_ratio": 4,
            "num_heads": 4,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "hidden_act": "quick_gelu",
        },
    }
    v = VisionConfig.from_hf_dict(published["vision_config"])
    assert (v.hidden_size, v.intermediate_size, v.depth, v.num_heads, v.layer_norm_eps) == (32, 128, 2, 4, 1e-6)
    r = ResamplerConfig.from_hf_dict(published)
    assert r == ResamplerConfig(32, 48, 2, 2, 1e-6, 1e-5)
    assert resampler_key_from_published("spatial_linear.3.bias") == "spatial_linear.ln.bias"
    assert resampler_key_from_published("temporal_linear.0.weight") == "temporal_linear.fc1.weight"
    with pytest.raises(ValueError, match="temporal_merge_size"):
        ResamplerConfig(temporal_merge_size=1)


def test_image_processor_output_end_to_end(pair):
    """pixel_values/grid_thw exactly as transformers' ERNIE-4.5-VL image processor makes them (K = 3·14² = 588)."""
    proc_mod = pytest.importorskip("transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe")
    ref_vit, ref_res, vit, res = pair
    g = torch.Generator().manual_seed(5)
    images = [(torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy() for h, w in ((60, 90), (90, 40))]
    batch = proc_mod.Ernie4_5_VLMoeImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 40)(
        images=images, return_tensors="pt"
    )
    pixel_values, grid_thw = batch["pixel_values"].float(), batch["image_grid_thw"]
    assert pixel_values.shape[1] == 588 and grid_thw[:, 0].tolist() == [1, 1]
    with torch.no_grad():
        ref_out = ref_res(ref_vit(pixel_values, grid_thw).last_hidden_state, grid_thw)
        out = res(vit(pixel_values, grid_thw), grid_thw)
    assert out.shape[0] == int(grid_thw.prod(-1).sum()) // 4
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
