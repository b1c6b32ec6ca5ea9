"""Images in chat messages, for a served VL model.

Accepted parts (OpenAI's chat format and its close relatives): `{"type": "image_url", "image_url": {"url": URL}}`,
`{"type": "image_url", "image_url": URL}`, `{"type": "input_image", "image_url": URL}`. Only `data:` URLs with
base64 payloads are taken: the server never fetches remote URLs (no outbound requests on behalf of clients, and no
network in many deployments). Each image becomes `Picture k:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>` in
the message text (as ERNIE-4.5-VL's chat template writes it), and after the chat template the prompt goes through
the model's image processor and `models.vl.prompt.build_mm_inputs`, which expands each placeholder to the image's
token count and makes the token-type ids.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from ernie_platform.inference.outputs import MMInputs
from ernie_platform.models.vl.prompt import IMAGE_END_TOKEN, IMAGE_MARKER, IMAGE_PLACEHOLDER_TOKEN, IMAGE_START_TOKEN
from ernie_platform.serving.protocol import bad_request

MAX_IMAGES = 8  # per request
MAX_IMAGE_BYTES = 16 * 2**20  # decoded size of one image file
MAX_IMAGE_PIXELS = 4096 * 4096  # before resizing (decompression bombs)
IMAGE_TOKENS = (IMAGE_START_TOKEN, IMAGE_PLACEHOLDER_TOKEN, IMAGE_END_TOKEN)
IMAGE_PART_TYPES = ("image_url", "input_image", "image")


def image_marker(k: int) -> str:
    """The text that stands for the k-th image (1-based) of a conversation."""
    return f"Picture {k}:{IMAGE_MARKER}"


def check_text(text: str, where: str) -> None:
    """User text may not contain the image special tokens: they would forge image slots."""
    found = [t for t in IMAGE_TOKENS if t in text]
    if found:
        raise bad_request(f"{where}: text may not contain the image tokens {found}", where, "invalid_value")


def image_from_part(part: dict[str, Any], where: str) -> Any:
    """The PIL image of one image content part (RGB), or a 400 naming the part."""
    from PIL import Image

    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}.image_url.url is required (a data: URL)", f"{where}.image_url", "invalid_value")
    if not url.startswith("data:"):
        raise bad_request(
            f"{where}.image_url.url: only data: URLs (data:image/png;base64,...) are accepted; this server does not "
            "fetch remote images",
            f"{where}.image_url",
            "invalid_image_url",
        )
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise bad_request(f"{where}.image_url.url: expected data:<mime>;base64,<data>", f"{where}.image_url",
                          "invalid_image_url")  # fmt: skip
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise bad_request(f"{where}: image larger than {MAX_IMAGE_BYTES} bytes", f"{where}.image_url", "invalid_image")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(
            f"{where}.image_url.url: invalid base64 data", f"{where}.image_url", "invalid_image_url"
        ) from e
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise bad_request(f"{where}: image of {img.width}x{img.height} pixels exceeds {MAX_IMAGE_PIXELS}",
                                  f"{where}.image_url", "invalid_image")  # fmt: skip
            return img.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:  # PIL: not an image, truncated, unknown format, bomb
        raise bad_request(f"{where}: not a readable image ({e})", f"{where}.image_url", "invalid_image") from e


def mm_prompt(tokenizer: Any, processor: Any, merge_size: int, text: str, images: list[Any]) -> tuple[list, MMInputs]:
    """(prompt token ids with expanded placeholders, MMInputs) of a rendered chat prompt and its images in order."""
    from ernie_platform.models.vl.prompt import build_mm_inputs

    try:
        pixels = processor(images)
        inputs = build_mm_inputs(tokenizer, text, pixels["image_grid_thw"], merge_size)
    except ValueError as e:
        raise bad_request(f"messages: {e}", "messages", "invalid_image") from e
    mm = MMInputs(
        pixel_values=pixels["pixel_values"],
        image_grid_thw=pixels["image_grid_thw"],
        mm_token_type_ids=inputs["mm_token_type_ids"][0].tolist(),
        moe_mm_token_type_ids=inputs["moe_mm_token_type_ids"][0].tolist(),
    )
    return inputs["input_ids"][0].tolist(), mm


__all__ = ["IMAGE_PART_TYPES", "MAX_IMAGES", "check_text", "image_from_part", "image_marker", "mm_prompt"]
