"""ERNIE-4.5-VL image preprocessing (PIL + NumPy + torch; no torchvision, no transformers at runtime).

Produces the same `pixel_values` / `image_grid_thw` as transformers' `Ernie4_5_VLMoeImageProcessorPil`
(transformers 5.25.0, the version in requirements/lock-cpu.txt;
`models/ernie4_5_vl_moe/image_processing_pil_ernie4_5_vl_moe.py`), bit for bit:

1. Convert to RGB. PIL images with an alpha band (or a `transparency` entry) are alpha-composited onto white with
   `PIL.Image.alpha_composite`, others use `Image.convert("RGB")`. NumPy arrays (H, W, C) uint8: 1 channel is
   repeated, 4 channels are blended onto white as `round(a/255 * rgb + (1 - a/255) * 255)` (transformers' NumPy path).
2. `smart_resize`: (h, w) → multiples of `factor = patch_size * merge_size` (28) with
   `min_pixels <= h*w <= max_pixels` (defaults 56*56 and 28*28*6177), keeping the aspect ratio (≤ 200).
   Resampling is PIL's `Image.resize((w, h), BICUBIC)` on the uint8 image, exactly as transformers does.
3. Rescale: `float64(x) * rescale_factor` cast to float32 (1/255 by default).
4. Normalize (float32): `(x - mean) / std` with the OpenAI CLIP mean/std.
5. Patchify: the CHW image is cut into `grid_h × grid_w` patches of `patch_size²` pixels, grouped by `merge_size²`
   windows: rows are ordered (block_row, block_col, row_in_block, col_in_block) and each row is the patch flattened
   as (C, T, P, P), where the temporal axis repeats the still image `temporal_patch_size` times (1 for images,
   so a row has 3*14*14 = 588 values). `pixel_values` is the concatenation over images: [Σ h*w, C*T*P*P] float32.
   `image_grid_thw` is int64 [num_images, 3] = (1, grid_h, grid_w), in patches (not merged tokens).

The language model sees `t*h*w / merge_size²` placeholder tokens per image (see `ernie_platform.models.vl.prompt`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]

# PIL resampling filters by their integer value (the value stored in preprocessor_config.json "resample").
_RESAMPLE_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


@dataclass
class ImageProcessorConfig:
    """Image preprocessing settings; defaults mirror transformers' `Ernie4_5_VLMoeImageProcessorPil`."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 1
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 6177
    image_mean: Tuple[float, ...] = field(default_factory=lambda: OPENAI_CLIP_MEAN)
    image_std: Tuple[float, ...] = field(default_factory=lambda: OPENAI_CLIP_STD)
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        if isinstance(self.resample, str):
            key = self.resample.lower()
            if key not in _RESAMPLE_NAMES:
                names = sorted(_RESAMPLE_NAMES)
                raise ValueError(f"unknown resample filter {self.resample!r}; expected one of {names}")
            self.resample = _RESAMPLE_NAMES[key]
        self.resample = int(self.resample)
        for name in ("patch_size", "merge_size", "temporal_patch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 <= min_pixels <= max_pixels, got {self.min_pixels} and {self.max_pixels}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean/image_std need 3 values (RGB), got {self.image_mean} / {self.image_std}")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must be non-zero, got {self.image_std}")

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this (patch_size * merge_size)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> ImageProcessorConfig:
        """Build from a `preprocessor_config.json` dict (transformers or original ERNIE layout); unknown keys ignored.

        Pixel bounds: `size = {"shortest_edge": min, "longest_edge": max}` (transformers; `shortest_edge`/
        `longest_edge` are pixel *counts* there) or `size = {"min_pixels", "max_pixels"}`; without `size`, top-level
        `min_pixels` / `max_pixels` (original ERNIE processor). `size` wins when both are present, as in transformers.
        """
        if not isinstance(d, dict):
            raise TypeError(f"expected a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        size = d.get("size")
        if isinstance(size, dict):
            lo = size.get("shortest_edge", size.get("min_pixels"))
            hi = size.get("longest_edge", size.get("max_pixels"))
            if lo is None or hi is None:
                raise ValueError(f"size must give shortest_edge/longest_edge (or min_pixels/max_pixels), got {size}")
            kwargs["min_pixels"], kwargs["max_pixels"] = int(lo), int(hi)
        elif size is not None:
            raise ValueError(f"size must be a dict of pixel counts, got {size!r}")
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike]) -> ImageProcessorConfig:
        """Read `preprocessor_config.json` from a checkpoint directory (or the json file itself)."""
        path = Path(path)
        if path.is_dir():
            path = path / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        return cls.from_dict(json.loads(path.read_text()))

    def to_dict(self) -> Dict[str, Any]:
        """transformers-style dict (`size` in pixel counts) that `from_dict` reads back."""
        d = asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        d["size"] = {"shortest_edge": d.pop("min_pixels"), "longest_edge": d.pop("max_pixels")}
        return d


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 6177
) -> Tuple[int, int]:
    """(h, w) rounded to multiples of `factor`, scaled into [min_pixels, max_pixels], aspect ratio kept.

    Same arithmetic as transformers' `smart_resize` (Python `round`, i.e. half-to-even, then floor/ceil).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image has an empty side: height={height}, width={width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, got {max(height, width) / min(height, width)} "
            f"for an image of {height}x{width} (HxW)"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        rgb = image.convert("RGB")
    return np.array(rgb)


def _array_to_hwc(image: np.ndarray, convert_rgb: bool) -> np.ndarray:
    """Validate an (H, W) / (H, W, C) uint8 array and return it as (H, W, 3) uint8."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"expected an image array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (channels last), "
            f"got shape {tuple(image.shape)}"
        )
    if image.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 in [0, 255], got dtype {image.dtype} (shape {image.shape})")
    channels = image.shape[-1]
    if channels == 3:
        return image
    if not convert_rgb:
        raise ValueError(f"image has {channels} channel(s) (shape {tuple(image.shape)}) but do_convert_rgb is False")
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    alpha = image[..., 3:4] / 255  # float64, as transformers' convert_to_rgb
    composite = alpha * image[..., :3] + (1 - alpha) * 255
    return np.round(composite).astype(np.uint8)


def _to_hwc_uint8(image: ImageLike, convert_rgb: bool) -> np.ndarray:
    if isinstance(image, Image.Image):
        if convert_rgb:
            return _pil_to_rgb(image)
        if image.mode != "RGB":
            raise ValueError(f"image mode is {image.mode!r} but do_convert_rgb is False (need 'RGB')")
        return np.array(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return _array_to_hwc(image, convert_rgb)
    raise TypeError(f"unsupported image type {type(image).__name__}; expected PIL.Image.Image or an (H, W, C) array")


class ErnieImageProcessor:
    """Callable image processor: images → `pixel_values` [Σ h*w, C*T*P*P] and `image_grid_thw` [num_images, 3]."""

    def __init__(self, config: ImageProcessorConfig | None = None) -> None:
        self.config = config if config is not None else ImageProcessorConfig()

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike]) -> ErnieImageProcessor:
        return cls(ImageProcessorConfig.from_pretrained(path))

    @property
    def merge_size(self) -> int:
        return self.config.merge_size

    def resized_size(self, height: int, width: int) -> Tuple[int, int]:
        """(height, width) after `smart_resize` (or unchanged when do_resize is off), validated for patching."""
        cfg = self.config
        if cfg.do_resize:
            h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
        else:
            h, w = height, width
        if h < cfg.factor or w < cfg.factor or h % cfg.factor or w % cfg.factor:
            raise ValueError(
                f"image of {height}x{width} (HxW) becomes {h}x{w}, which is not a positive multiple of "
                f"patch_size*merge_size={cfg.factor} on both sides (min_pixels={cfg.min_pixels}, "
                f"do_resize={cfg.do_resize})"
            )
        return h, w

    def num_patches(self, height: int, width: int) -> int:
        """Rows of `pixel_values` for an image of this size (grid_h * grid_w)."""
        h, w = self.resized_size(height, width)
        return (h // self.config.patch_size) * (w // self.config.patch_size)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens the language model sees for an image of this size."""
        return self.num_patches(height, width) // self.config.merge_size**2

    def preprocess_one(self, image: ImageLike) -> Tuple[np.ndarray, Tuple[int, int, int]]:
        """One image → (patches [h*w, C*T*P*P] float32, (1, grid_h, grid_w))."""
        cfg = self.config
        hwc = _to_hwc_uint8(image, cfg.do_convert_rgb)
        height, width = hwc.shape[:2]
        new_h, new_w = self.resized_size(height, width)
        if cfg.do_resize:
            # transformers goes uint8 CHW → PIL (HWC, uint8) → Image.resize((w, h), resample) → numpy.
            hwc = np.array(Image.fromarray(hwc).resize((new_w, new_h), resample=cfg.resample))
        chw = np.moveaxis(hwc, -1, 0)
        if cfg.do_rescale:
            chw = (chw.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
        if cfg.do_normalize:
            if not np.issubdtype(chw.dtype, np.floating):
                chw = chw.astype(np.float32)
            mean = np.asarray(cfg.image_mean, dtype=chw.dtype)[:, None, None]
            std = np.asarray(cfg.image_std, dtype=chw.dtype)[:, None, None]
            chw = (chw - mean) / std
        return self._patchify(chw)

    def _patchify(self, chw: np.ndarray) -> Tuple[np.ndarray, Tuple[int, int, int]]:
        cfg = self.config
        p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
        image = np.asarray(chw, dtype=np.float32)
        channels, height, width = image.shape
        grid_h, grid_w = height // p, width // p
        patches = image.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
        patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, ph, pw)
        patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
        flat = patches.reshape(grid_h * grid_w, channels * t * p * p)
        return flat, (1, grid_h, grid_w)

    def __call__(
        self, images: Union[ImageLike, Sequence[ImageLike]], return_tensors: str | None = "pt"
    ) -> Dict[str, Union[torch.Tensor, np.ndarray]]:
        """Preprocess one image or a list of images (each its own size).

        Returns `pixel_values` (float32, [Σ grid_h*grid_w, 3*T*P*P]) and `image_grid_thw` (int64, [num_images, 3]) as
        torch tensors (`return_tensors="pt"`) or NumPy arrays (`return_tensors="np"` / None).
        """
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        batch: List[ImageLike] = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("no images given")
        all_patches, grids = [], []
        for i, image in enumerate(batch):
            try:
                patches, grid = self.preprocess_one(image)
            except (ValueError, TypeError) as e:
                if len(batch) == 1:
                    raise
                raise type(e)(f"image {i}: {e}") from e
            all_patches.append(patches)
            grids.append(grid)
        pixel_values = np.concatenate(all_patches, axis=0)
        image_grid_thw = np.asarray(grids, dtype=np.int64)
        if return_tensors == "pt":
            return {"pixel_values": torch.from_numpy(pixel_values), "image_grid_thw": torch.from_numpy(image_grid_thw)}
        return {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}


__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ErnieImageProcessor",
    "ImageProcessorConfig",
    "smart_resize",
]
