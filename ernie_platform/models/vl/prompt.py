"""Multimodal prompt layout for ERNIE-4.5-VL: text + images → `input_ids` and token-type ids.

Token layout (as transformers' `Ernie4_5_VLMoeProcessor` and the published chat template produce it)::

    ... text ... <|IMAGE_START|> <|IMAGE_PLACEHOLDER|> × N <|IMAGE_END|> ... text ...

* One image is written in a prompt as `<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>` (the chat template emits
  `Picture k:` before it); the single placeholder is expanded to N placeholders, START/END are kept as is.
* N = t * h * w / merge_size² for `image_grid_thw` row (t, h, w) (h, w in vision patches; merge_size 2 → 4 patches
  per token). Images have no temporal merge (t = 1); video would additionally divide by the temporal merge size.
  The vision encoder output for image i replaces its N placeholder embeddings (matched by `image_token_id`).
* `mm_token_type_ids`: 1 on the placeholders only, 0 elsewhere (START/END are text here). The model's
  `get_rope_index` groups consecutive type-1 tokens into one image and gives them 3D (t, h, w) M-RoPE positions,
  so START/END are what keeps two adjacent images apart.
* `moe_mm_token_type_ids`: 1 on START, the placeholders and END; routes these tokens to the vision experts in the
  MoE layers.
* `attention_mask`: all ones (single unpadded sequence).

Two input forms for `build_mm_inputs`:

* a string already containing `<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>` once per image (e.g. a rendered
  chat template), images in order of appearance;
* a list of segments: `str` (text) or `IMAGE` / `{"type": "image"}` (an image), `{"type": "text", "text": ...}`.
  Text segments may not contain the image special tokens (so user text cannot forge image slots).

The expanded string is tokenized in one call, as transformers' processor does, so ids match it for any tokenizer
that has the three special tokens (the built-in byte tokenizer included).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Union

import torch

IMAGE_START_TOKEN = "<|IMAGE_START|>"
IMAGE_PLACEHOLDER_TOKEN = "<|IMAGE_PLACEHOLDER|>"
IMAGE_END_TOKEN = "<|IMAGE_END|>"
IMAGE_MARKER = IMAGE_START_TOKEN + IMAGE_PLACEHOLDER_TOKEN + IMAGE_END_TOKEN

TEXT_TOKEN_TYPE = 0
IMAGE_TOKEN_TYPE = 1


class _ImageSegment:
    """Sentinel for an image in a segment list."""

    def __repr__(self) -> str:
        return "IMAGE"


IMAGE = _ImageSegment()

Segment = Union[str, _ImageSegment, Mapping[str, Any]]
GridLike = Union[torch.Tensor, Sequence[Sequence[int]], None]


def num_image_tokens(grid_thw: Sequence[int], merge_size: int = 2) -> int:
    """Placeholder tokens for one image with grid (t, h, w): t*h*w / merge_size²."""
    t, h, w = (int(v) for v in grid_thw)
    if min(t, h, w) < 1:
        raise ValueError(f"image_grid_thw row must be positive, got {(t, h, w)}")
    patches = t * h * w
    if patches % (merge_size * merge_size):
        raise ValueError(f"grid {(t, h, w)} has {patches} patches, not a multiple of merge_size²={merge_size**2}")
    return patches // (merge_size * merge_size)


def _grid_rows(image_grid_thw: GridLike) -> List[List[int]]:
    if image_grid_thw is None:
        return []
    rows = image_grid_thw.tolist() if isinstance(image_grid_thw, torch.Tensor) else [list(r) for r in image_grid_thw]
    for r in rows:
        if len(r) != 3:
            raise ValueError(f"image_grid_thw must have shape [num_images, 3], got a row {r}")
    return rows


def segments_to_text(segments: Sequence[Segment]) -> str:
    """Render a segment list to a prompt string with one `IMAGE_MARKER` per image."""
    if isinstance(segments, str):
        raise TypeError("segments must be a list; pass a plain string prompt to build_mm_inputs directly")
    parts = []
    for i, seg in enumerate(segments):
        if isinstance(seg, Mapping):
            kind = seg.get("type")
            if kind in ("image", "image_url"):
                seg = IMAGE
            elif kind == "text":
                seg = seg.get("text", "")
            else:
                raise ValueError(f"segment {i}: unknown type {kind!r} (expected 'text' or 'image')")
        if isinstance(seg, _ImageSegment):
            parts.append(IMAGE_MARKER)
        elif isinstance(seg, str):
            for special in (IMAGE_START_TOKEN, IMAGE_PLACEHOLDER_TOKEN, IMAGE_END_TOKEN):
                if special in seg:
                    raise ValueError(f"segment {i}: text contains the image special token {special}")
            parts.append(seg)
        else:
            raise TypeError(f"segment {i}: expected str, IMAGE or a dict, got {type(seg).__name__}")
    return "".join(parts)


def expand_image_placeholders(text: str, image_grid_thw: GridLike, merge_size: int = 2) -> str:
    """Replace the k-th `<|IMAGE_PLACEHOLDER|>` with N_k placeholders (N_k from row k of `image_grid_thw`).

    Each placeholder must be written as `<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>`.
    """
    rows = _grid_rows(image_grid_thw)
    pieces = text.split(IMAGE_PLACEHOLDER_TOKEN)
    n_markers = len(pieces) - 1
    if n_markers != len(rows):
        raise ValueError(
            f"the prompt has {n_markers} {IMAGE_PLACEHOLDER_TOKEN} marker(s) but image_grid_thw has {len(rows)} "
            f"image(s); write each image once as {IMAGE_MARKER}"
        )
    out = [pieces[0]]
    for k, row in enumerate(rows):
        if not pieces[k].endswith(IMAGE_START_TOKEN) or not pieces[k + 1].startswith(IMAGE_END_TOKEN):
            raise ValueError(f"image {k}: {IMAGE_PLACEHOLDER_TOKEN} must be written as {IMAGE_MARKER}")
        out.append(IMAGE_PLACEHOLDER_TOKEN * num_image_tokens(row, merge_size))
        out.append(pieces[k + 1])
    return "".join(out)


def _token_id(tokenizer: Any, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tid is None or (unk is not None and tid == unk and getattr(tokenizer, "unk_token", None) != token):
        raise ValueError(f"the tokenizer has no {token} token (needed for image prompts)")
    return int(tid)


def image_token_ids(tokenizer: Any) -> Dict[str, int]:
    """`{"image_start_token_id", "image_token_id", "image_end_token_id"}` from a tokenizer."""
    return {
        "image_start_token_id": _token_id(tokenizer, IMAGE_START_TOKEN),
        "image_token_id": _token_id(tokenizer, IMAGE_PLACEHOLDER_TOKEN),
        "image_end_token_id": _token_id(tokenizer, IMAGE_END_TOKEN),
    }


def mm_token_type_ids(
    input_ids: torch.Tensor,
    image_token_id: int,
    image_start_token_id: int | None = None,
    image_end_token_id: int | None = None,
) -> torch.Tensor:
    """Token types from ids: 1 on `image_token_id` (and on START/END when their ids are given, the MoE variant)."""
    types = (input_ids == image_token_id).long()
    for tid in (image_start_token_id, image_end_token_id):
        if tid is not None:
            types = types | (input_ids == tid).long()
    return types


def build_mm_inputs(
    tokenizer: Any,
    prompt: Union[str, Sequence[Segment]],
    image_grid_thw: GridLike = None,
    merge_size: int = 2,
    add_special_tokens: bool = False,
) -> Dict[str, torch.Tensor]:
    """Tokenize a text+image prompt into model inputs (batch of one).

    Args:
        tokenizer: a transformers tokenizer (or anything with `__call__(text, add_special_tokens=...)` returning
            `input_ids` and `convert_tokens_to_ids`) that has the three image special tokens.
        prompt: a string with one `IMAGE_MARKER` per image, or a segment list (see the module docstring).
        image_grid_thw: [num_images, 3] (t, h, w) per image, from `ErnieImageProcessor`; None for text only.
        merge_size: spatial merge size of the vision encoder (2 for ERNIE-4.5-VL).
        add_special_tokens: passed to the tokenizer; False by default since chat templates add the BOS text.

    Returns:
        `input_ids`, `attention_mask`, `mm_token_type_ids` (placeholders = 1) and `moe_mm_token_type_ids`
        (START, placeholders, END = 1), each a LongTensor [1, T].
    """
    text = prompt if isinstance(prompt, str) else segments_to_text(prompt)
    rows = _grid_rows(image_grid_thw)
    ids = image_token_ids(tokenizer) if rows or IMAGE_PLACEHOLDER_TOKEN in text else None
    text = expand_image_placeholders(text, rows, merge_size)
    encoded = tokenizer(text, add_special_tokens=add_special_tokens)
    input_ids = torch.tensor([list(encoded["input_ids"])], dtype=torch.long)
    if input_ids.numel() == 0:
        raise ValueError("the prompt tokenizes to an empty sequence")
    if ids is None:
        zeros = torch.zeros_like(input_ids)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": zeros,
            "moe_mm_token_type_ids": zeros.clone(),
        }
    expected = sum(num_image_tokens(r, merge_size) for r in rows)
    found = int((input_ids == ids["image_token_id"]).sum())
    if found != expected:
        raise ValueError(
            f"expected {expected} {IMAGE_PLACEHOLDER_TOKEN} tokens after tokenization, found {found}; the tokenizer "
            "must encode the image special tokens as single tokens"
        )
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": mm_token_type_ids(input_ids, ids["image_token_id"]),
        "moe_mm_token_type_ids": mm_token_type_ids(
            input_ids, ids["image_token_id"], ids["image_start_token_id"], ids["image_end_token_id"]
        ),
    }


__all__ = [
    "IMAGE",
    "IMAGE_END_TOKEN",
    "IMAGE_MARKER",
    "IMAGE_PLACEHOLDER_TOKEN",
    "IMAGE_START_TOKEN",
    "IMAGE_TOKEN_TYPE",
    "TEXT_TOKEN_TYPE",
    "build_mm_inputs",
    "expand_image_placeholders",
    "image_token_ids",
    "mm_token_type_ids",
    "num_image_tokens",
    "segments_to_text",
]
