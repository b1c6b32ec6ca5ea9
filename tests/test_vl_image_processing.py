"""ERNIE-4.5-VL image processor and prompt builder: exact parity with transformers, layout, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ernie_platform.models import load_tokenizer
from ernie_platform.models.vl import prompt as vl_prompt
from ernie_platform.models.vl.image_processing import ErnieImageProcessor, ImageProcessorConfig, smart_resize
from ernie_platform.models.vl.prompt import (
    IMAGE,
    IMAGE_END_TOKEN,
    IMAGE_MARKER,
    IMAGE_PLACEHOLDER_TOKEN,
    IMAGE_START_TOKEN,
    build_mm_inputs,
    num_image_tokens,
)

hf_pil = pytest.importorskip("transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe")
HFImageProcessor = hf_pil.Ernie4_5_VLMoeImageProcessorPil


def _rgb(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _assert_same(ours: dict, ref) -> None:
    # Same NumPy ops in the same order (float64 rescale → float32, float32 (x-mean)/std), so bit-identical.
    assert ours["pixel_values"].dtype == torch.float32
    assert ours["image_grid_thw"].dtype == torch.int64
    assert torch.equal(ours["image_grid_thw"], torch.as_tensor(ref["image_grid_thw"]))
    assert torch.equal(ours["pixel_values"], torch.as_tensor(ref["pixel_values"]))


@pytest.fixture(scope="module")
def hf():
    return HFImageProcessor()


@pytest.fixture(scope="module")
def ours():
    return ErnieImageProcessor()


def test_defaults_mirror_transformers(hf):
    cfg = ImageProcessorConfig()
    assert (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size) == (
        hf.patch_size,
        hf.merge_size,
        hf.temporal_patch_size,
    )
    assert (cfg.min_pixels, cfg.max_pixels) == (hf.size["shortest_edge"], hf.size["longest_edge"])
    assert cfg.image_mean == tuple(hf.image_mean) and cfg.image_std == tuple(hf.image_std)
    assert cfg.rescale_factor == hf.rescale_factor and cfg.resample == int(hf.resample)


@pytest.mark.parametrize(
    "hw",
    [(30, 40), (224, 224), (333, 517), (57, 29), (1, 1), (10, 1000), (517, 91), (2400, 2100)],
    ids=["tiny-upscaled", "square", "odd", "odd-small", "1px", "thin", "tall", "large-downscaled"],
)
def test_rgb_parity(hf, ours, hw):
    img = _rgb(*hw, seed=hw[0] * 7 + hw[1])
    ref = hf(img, return_tensors="pt")
    out = ours(img)
    _assert_same(out, ref)
    grid = out["image_grid_thw"][0].tolist()
    assert out["pixel_values"].shape == (grid[1] * grid[2], 3 * 14 * 14)
    h, w = grid[1] * 14, grid[2] * 14
    assert ImageProcessorConfig().min_pixels <= h * w <= ImageProcessorConfig().max_pixels


def test_large_image_respects_max_pixels(ours):
    out = ours(_rgb(2400, 2100))
    _, gh, gw = out["image_grid_thw"][0].tolist()
    assert (gh * 14) * (gw * 14) <= ImageProcessorConfig().max_pixels < 2400 * 2100


def _on_white(img):
    """Transparency composited onto white, as our processor and transformers >= 5.25's `convert_to_rgb` do (5.19, the
    version locked beside vLLM, drops the alpha channel instead and refuses RGBA arrays): the reference gets the
    composited RGB image, so the comparison holds for both versions."""
    if isinstance(img, np.ndarray):
        return np.array(_on_white(Image.fromarray(img, mode="RGBA"))) if img.shape[-1] == 4 else img
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img


def test_mode_conversions_parity(hf, ours):
    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 256, (45, 70, 4), dtype=np.uint8), mode="RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (64, 50), dtype=np.uint8), mode="L")
    pal = _rgb(40, 60, seed=3).convert("P")
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    la = Image.fromarray(rng.integers(0, 256, (33, 80, 2), dtype=np.uint8), mode="LA")
    for img in (rgba, gray, pal, pal_t, la):
        _assert_same(ours(img), hf(_on_white(img), return_tensors="pt"))


def test_numpy_inputs_parity(hf, ours):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (37, 90, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (61, 45, 4), dtype=np.uint8)
    _assert_same(ours(rgb), hf(rgb, return_tensors="pt"))
    _assert_same(ours(rgba), hf(_on_white(rgba), return_tensors="pt"))
    # NumPy input equals the same pixels as a PIL image.
    _assert_same(ours(rgb), ours(Image.fromarray(rgb)))
    # Grayscale arrays (H, W) / (H, W, 1) replicate the channel, like PIL's L → RGB.
    gray = rng.integers(0, 256, (50, 70), dtype=np.uint8)
    _assert_same(ours(gray), ours(Image.fromarray(gray, mode="L")))
    _assert_same(ours(gray[:, :, None]), ours(Image.fromarray(gray, mode="L")))
    _assert_same(ours(torch.from_numpy(rgb)), ours(rgb))


def test_batch_parity(hf, ours):
    imgs = [_rgb(120, 300, seed=5), _rgb(401, 77, seed=6)]
    out = ours(imgs)
    _assert_same(out, hf(imgs, return_tensors="pt"))
    sizes = [int(t.prod()) for t in out["image_grid_thw"]]
    assert out["pixel_values"].shape[0] == sum(sizes)
    _assert_same({k: v[:1] if k == "image_grid_thw" else v[: sizes[0]] for k, v in out.items()}, ours(imgs[0]))
    np_out = ours(imgs, return_tensors="np")
    assert isinstance(np_out["pixel_values"], np.ndarray)
    assert np.array_equal(np_out["pixel_values"], out["pixel_values"].numpy())


def test_custom_config_parity():
    d = {
        "size": {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 20},
        "temporal_patch_size": 2,
        "image_processor_type": "Ernie4_5_VLMoeImageProcessor",
        "resample": 2,
    }
    ours = ErnieImageProcessor(ImageProcessorConfig.from_dict(d))
    ref = HFImageProcessor(
        size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 20}, temporal_patch_size=2, resample=2
    )
    imgs = [_rgb(500, 300, seed=8), _rgb(20, 30, seed=9)]
    out = ours(imgs)
    _assert_same(out, ref(imgs, return_tensors="pt"))
    assert out["pixel_values"].shape[1] == 3 * 2 * 14 * 14
    # temporal copies are identical (a still image repeated over T)
    pv = out["pixel_values"].view(-1, 3, 2, 14, 14)
    assert torch.equal(pv[:, :, 0], pv[:, :, 1])


def test_config_from_dict_variants(tmp_path):
    orig = ImageProcessorConfig.from_dict(
        {"min_pixels": 1000, "max_pixels": 50000, "patch_size": 14, "merge_size": 2, "unknown_key": 1}
    )
    assert (orig.min_pixels, orig.max_pixels) == (1000, 50000)
    both = ImageProcessorConfig.from_dict(
        {"min_pixels": 1, "max_pixels": 2, "size": {"min_pixels": 5, "max_pixels": 9}}
    )
    assert (both.min_pixels, both.max_pixels) == (5, 9)
    cfg = ImageProcessorConfig(min_pixels=784, max_pixels=784 * 9, resample="bilinear")
    assert cfg.resample == 2
    assert ImageProcessorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg.to_dict()))
    assert ErnieImageProcessor.from_pretrained(tmp_path).config == cfg
    with pytest.raises(ValueError, match="shortest_edge"):
        ImageProcessorConfig.from_dict({"size": {"height": 224, "width": 224}})
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        ImageProcessorConfig(min_pixels=10, max_pixels=5)
    with pytest.raises(ValueError, match="3 values"):
        ImageProcessorConfig(image_mean=(0.5,))


def test_num_tokens_helpers(ours):
    assert smart_resize(60, 90) == (56, 84)
    assert ours.num_patches(60, 90) == 4 * 6
    assert ours.num_image_tokens(60, 90) == 6 == num_image_tokens([1, 4, 6])


def test_errors(ours):
    with pytest.raises(ValueError, match=r"\(40, 40, 2\)"):
        ours(np.zeros((40, 40, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(1, 40, 40, 3\)"):
        ours(np.zeros((1, 40, 40, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(3, 40, 40\)"):  # channels-first is rejected, not guessed
        ours(np.zeros((3, 40, 40), dtype=np.uint8))
    with pytest.raises(ValueError, match="float32"):
        ours(np.zeros((40, 40, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="aspect ratio"):
        ours(np.zeros((2, 500, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty side"):
        ours(np.zeros((0, 10, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="unsupported image type"):
        ours("image.png")
    with pytest.raises(ValueError, match="no images"):
        ours([])
    with pytest.raises(ValueError, match="image 1: .*shape"):
        ours([np.zeros((40, 40, 3), dtype=np.uint8), np.zeros((40, 40, 5), dtype=np.uint8)])
    with pytest.raises(ValueError, match="return_tensors"):
        ours(_rgb(40, 40), return_tensors="tf")
    # Too small after resize: with min_pixels=0 a 10x100 image rounds to 0 rows.
    tiny = ErnieImageProcessor(ImageProcessorConfig(min_pixels=0))
    with pytest.raises(ValueError, match="10x100 .* becomes 0x112"):
        tiny(np.zeros((10, 100, 3), dtype=np.uint8))
    no_resize = ErnieImageProcessor(ImageProcessorConfig(do_resize=False))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        no_resize(np.zeros((30, 56, 3), dtype=np.uint8))
    assert no_resize(np.zeros((28, 56, 3), dtype=np.uint8))["image_grid_thw"].tolist() == [[1, 2, 4]]
    no_rgb = ErnieImageProcessor(ImageProcessorConfig(do_convert_rgb=False))
    with pytest.raises(ValueError, match="do_convert_rgb"):
        no_rgb(Image.new("RGBA", (40, 40)))


# ---------------------------------------------------------------- prompt builder


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _hf_processor(tok):
    """transformers' Ernie4_5_VLMoeProcessor around our built-in tokenizer + its PIL image processor, offline."""
    from transformers import Ernie4_5_VLMoeProcessor

    names = {
        "image_token": IMAGE_PLACEHOLDER_TOKEN,
        "image_start_token": IMAGE_START_TOKEN,
        "image_end_token": IMAGE_END_TOKEN,
        "video_token": None,  # the built-in tokenizer has no video placeholder
        "video_start_token": "<|VIDEO_START|>",
        "video_end_token": "<|VIDEO_END|>",
    }
    for name, token in names.items():
        setattr(tok, name, token)
        setattr(tok, f"{name}_id", None if token is None else tok.convert_tokens_to_ids(token))

    class _Processor(Ernie4_5_VLMoeProcessor):
        # Skips the class check that needs a video processor (torchvision); images only here.
        def check_argument_for_proper_class(self, attribute_name, arg):
            return None

    return _Processor(image_processor=HFImageProcessor(), tokenizer=tok, video_processor=None)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 __array__ warning inside transformers' processor
def test_prompt_matches_transformers_processor(ours):
    tok = load_tokenizer(None)  # own instance: the helper sets attributes on it
    proc = _hf_processor(tok)
    images = [_rgb(60, 90, seed=11), _rgb(100, 57, seed=12)]
    text = f"<|begin_of_sentence|>User: Picture 1:{IMAGE_MARKER}Picture 2:{IMAGE_MARKER}Compare.\nAssistant: "
    ref = proc(images=images, text=text, return_tensors="pt")
    pix = ours(images)
    out = build_mm_inputs(tok, text, pix["image_grid_thw"], add_special_tokens=True)
    _assert_same(pix, ref)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "moe_mm_token_type_ids"):
        assert torch.equal(out[key], ref[key].long()), key
    # The segment form gives the same ids.
    segs = [
        "<|begin_of_sentence|>User: Picture 1:",
        IMAGE,
        "Picture 2:",
        {"type": "image"},
        {"type": "text", "text": "Compare.\nAssistant: "},
    ]
    seg_out = build_mm_inputs(tok, segs, pix["image_grid_thw"])
    assert torch.equal(seg_out["input_ids"], out["input_ids"])


def test_prompt_layout_by_hand(tok):
    grid = torch.tensor([[1, 4, 6], [1, 2, 2]])
    out = build_mm_inputs(tok, ["a", IMAGE, "b", IMAGE], grid)
    ids = out["input_ids"][0].tolist()
    s, p, e = (tok.convert_tokens_to_ids(t) for t in (IMAGE_START_TOKEN, IMAGE_PLACEHOLDER_TOKEN, IMAGE_END_TOKEN))
    a, b = tok("a", add_special_tokens=False)["input_ids"], tok("b", add_special_tokens=False)["input_ids"]
    assert ids == a + [s] + [p] * 6 + [e] + b + [s] + [p] * 1 + [e]
    types = out["mm_token_type_ids"][0].tolist()
    moe = out["moe_mm_token_type_ids"][0].tolist()
    assert types == [int(i == p) for i in ids]
    assert moe == [int(i in (s, p, e)) for i in ids]
    assert out["attention_mask"].shape == out["input_ids"].shape == (1, len(ids))
    assert all(v.dtype == torch.long for v in out.values())
    # one run of type-1 tokens per image (what get_rope_index relies on)
    runs = sum(1 for i, t in enumerate(types) if t == 1 and (i == 0 or types[i - 1] == 0))
    assert runs == 2


def test_prompt_text_only_and_helpers(tok):
    out = build_mm_inputs(tok, "hello")
    assert out["input_ids"][0].tolist() == tok("hello", add_special_tokens=False)["input_ids"]
    assert not out["mm_token_type_ids"].any() and not out["moe_mm_token_type_ids"].any()
    assert num_image_tokens((1, 46, 30)) == 345
    assert num_image_tokens((2, 4, 4), merge_size=2) == 8
    assert vl_prompt.expand_image_placeholders(f"x{IMAGE_MARKER}", [[1, 2, 4]]) == (
        f"x{IMAGE_START_TOKEN}{IMAGE_PLACEHOLDER_TOKEN * 2}{IMAGE_END_TOKEN}"
    )


def test_prompt_errors(tok):
    with pytest.raises(ValueError, match="1 <\\|IMAGE_PLACEHOLDER\\|> marker.* 2 image"):
        build_mm_inputs(tok, f"x{IMAGE_MARKER}", [[1, 2, 2], [1, 2, 2]])
    with pytest.raises(ValueError, match="0 <\\|IMAGE_PLACEHOLDER\\|> marker"):
        build_mm_inputs(tok, "no image", [[1, 2, 2]])
    with pytest.raises(ValueError, match="must be written as"):
        build_mm_inputs(tok, f"x{IMAGE_PLACEHOLDER_TOKEN}", [[1, 2, 2]])
    with pytest.raises(ValueError, match="segment 0: text contains"):
        build_mm_inputs(tok, [f"evil {IMAGE_START_TOKEN}", IMAGE], [[1, 2, 2]])
    with pytest.raises(ValueError, match="not a multiple of merge_size"):
        build_mm_inputs(tok, [IMAGE], [[1, 3, 3]])
    with pytest.raises(ValueError, match=r"shape \[num_images, 3\]"):
        build_mm_inputs(tok, [IMAGE], [[2, 2]])
    with pytest.raises(ValueError, match="unknown type"):
        build_mm_inputs(tok, [{"type": "audio"}], None)

    class NoImageTokens:
        unk_token, unk_token_id = "<unk>", 0

        def convert_tokens_to_ids(self, token):
            return 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1, 2, 3]}

    with pytest.raises(ValueError, match="no <\\|IMAGE_START\\|> token"):
        build_mm_inputs(NoImageTokens(), [IMAGE], [[1, 2, 2]])
