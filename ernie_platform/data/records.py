"""Record parsing for file-based pretraining data: rows of `read_dataset` → text documents or image–text samples.

Every function that can fail on bad input raises `DataError` with the record's origin (`file:line`), so the training
loop either stops with a message that points at the record (`data.on_error=raise`) or drops it and counts it in
`DataStats` (`data.on_error=skip`).

Record shapes (one JSON object per line in .jsonl/.json files, one row in .parquet files):

* text: `{"<text_key>": "..."}`.
* image–text, ERNIEKit's shape::

      {"image_info": [{"image_url": "<path | URI | data:image/...;base64,...>", "matched_text_index": i}, ...],
       "text_info": [{"text": "...", "tag": "mask" | "no_mask"}, ...]}

  Images are inserted before text segment `matched_text_index` (== len(text_info): after the last segment; several
  images with the same index keep their list order). "mask" segments get no loss (labels -100), "no_mask" segments
  are trained on. This follows ERNIEKit's convertor, which turns "mask" segments into user turns and "no_mask"
  segments into assistant turns (the trained ones); here the segments are concatenated as raw text, without a chat
  template or separators (pretraining).
* image–text, simple: `{"image": <path | URI | base64 str | bytes>, "prompt": "...", "answer": "..."}` (loss on the
  answer only) or `{"image": ..., "text": "..."}` (loss on all text). The image comes first.

Token layout of a sample (as `SyntheticVLDataset.get` / `build_mm_inputs`): each image is `<|IMAGE_START|>`,
N × `<|IMAGE_PLACEHOLDER|>` (N = t·h·w / merge² from the processor's `image_grid_thw`), `<|IMAGE_END|>`; text
segments are tokenized one by one without special tokens (so loss masks follow segment boundaries exactly); EOS
ends the sample and has loss. Image tokens never have loss.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import posixpath
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

IGNORE_INDEX = -100
ON_ERROR = ("raise", "skip")


class DataError(ValueError):
    """A bad data record or source; the message starts with `file:line` when it is about one record."""


@dataclass
class DataStats:
    """Counters of one worker's data stream (the training loop logs `as_dict()`).

    records: rows of this rank's shard that were parsed; skipped: bad ones dropped (`on_error=skip`); tokens: tokens
    emitted in batches (text: packed tokens incl. EOS; VL: sequence tokens before padding); truncated: VL samples
    cut to `seq_len`; epochs: passes started over this rank's records.
    """

    records: int = 0
    skipped: int = 0
    tokens: int = 0
    truncated: int = 0
    epochs: int = 0

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)


# ---- rows → records --------------------------------------------------------------------------------------------------
def origin(path: str, line: Union[int, str, None]) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def parse_row(row: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """The record of a `read_dataset` row: JSON-decoded `raw` (jsonl rows), or the row's columns (parquet rows)."""
    if "raw" in row and isinstance(row.get("raw"), (str, bytes)) and set(row) <= {"raw", "path", "line"}:
        raw = row["raw"]
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: invalid JSON ({e})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        return record
    return {k: _plain(v) for k, v in row.items() if k not in ("path", "line")}


def _plain(value: Any) -> Any:
    """NumPy scalars/arrays (from Arrow rows) → Python values, recursively."""
    if hasattr(value, "tolist") and not isinstance(value, (bytes, str)):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def text_of(record: Mapping[str, Any], text_key: str, where: str) -> str:
    """The document of a text record."""
    if text_key not in record:
        raise DataError(f"{where}: missing field {text_key!r} (data.text_key); fields: {sorted(record)[:10]}")
    text = record[text_key]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_key!r} must be a string, got {type(text).__name__}")
    return text


# ---- image–text records ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRef:
    source: Any  # path / URI / data URI / base64 string / bytes


Segment = Union[ImageRef, Tuple[str, bool]]  # an image, or (text, has_loss)


def vl_segments(record: Mapping[str, Any], where: str) -> List[Segment]:
    """The ordered segments of an image–text record (see the module docstring for the accepted shapes)."""
    if "text_info" in record or "image_info" in record:
        return _erniekit_segments(record, where)
    if "image" in record:
        image = record["image"]
        if not isinstance(image, (str, bytes, bytearray)) or not image:
            raise DataError(f"{where}: field 'image' must be a non-empty path, URI, base64 string or bytes")
        segs: List[Segment] = [ImageRef(image)]
        if "prompt" in record or "answer" in record:
            for key in ("prompt", "answer"):
                if not isinstance(record.get(key), str):
                    raise DataError(f"{where}: field {key!r} must be a string (prompt/answer record)")
            return segs + [(record["prompt"], False), (record["answer"], True)]
        if not isinstance(record.get("text"), str):
            raise DataError(f"{where}: an image record needs 'text' or 'prompt'+'answer' strings")
        return segs + [(record["text"], True)]
    raise DataError(f"{where}: not an image-text record (expected 'image_info'/'text_info' or 'image' fields)")


def _erniekit_segments(record: Mapping[str, Any], where: str) -> List[Segment]:
    texts, images = record.get("text_info") or [], record.get("image_info") or []
    if not isinstance(texts, list) or not isinstance(images, list):
        raise DataError(f"{where}: 'text_info' and 'image_info' must be lists")
    if not texts:
        raise DataError(f"{where}: 'text_info' is empty")
    before: List[List[ImageRef]] = [[] for _ in range(len(texts) + 1)]
    for k, info in enumerate(images):
        if not isinstance(info, Mapping) or "image_url" not in info:
            raise DataError(f"{where}: image_info[{k}] needs an 'image_url'")
        url, idx = info["image_url"], info.get("matched_text_index", 0)
        if not isinstance(url, (str, bytes, bytearray)) or not url:
            raise DataError(f"{where}: image_info[{k}].image_url must be a non-empty string")
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx <= len(texts):
            raise DataError(f"{where}: image_info[{k}].matched_text_index={idx!r} not in [0, {len(texts)}]")
        before[idx].append(ImageRef(url))
    segs: List[Segment] = []
    for k, info in enumerate(texts):
        segs.extend(before[k])
        if not isinstance(info, Mapping) or not isinstance(info.get("text"), str):
            raise DataError(f"{where}: text_info[{k}].text must be a string")
        tag = info.get("tag", "no_mask")
        if tag not in ("mask", "no_mask"):
            raise DataError(f"{where}: text_info[{k}].tag={tag!r} (expected 'mask' or 'no_mask')")
        segs.append((info["text"], tag == "no_mask"))
    segs.extend(before[len(texts)])
    return segs


def _join(base_dir: Optional[str], path: str) -> str:
    if base_dir is None or "://" in path or path.startswith("/"):
        return path
    if "://" in base_dir:
        return base_dir.rstrip("/") + "/" + path
    return posixpath.normpath(posixpath.join(base_dir, path)) if base_dir else path


def image_bytes(source: Any, base_dir: Optional[str], where: str) -> bytes:
    """Raw image bytes from bytes, a `data:` URI, a path (relative to `base_dir`) or fsspec URI, or base64 text."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if not isinstance(source, str):
        raise DataError(f"{where}: image must be a string or bytes, got {type(source).__name__}")
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise DataError(f"{where}: only base64 data: URIs are supported for images")
        return _b64(payload, where)
    looks_like_path = len(source) < 4096 and ("/" in source or "." in source[-6:] or "://" in source)
    if looks_like_path:
        import fsspec

        full = _join(base_dir, source)
        try:
            with fsspec.open(full, "rb") as f:
                return f.read()
        except (OSError, ValueError, ImportError, KeyError) as e:
            if "://" in source or not _maybe_b64(source):
                raise DataError(f"{where}: cannot read image {full!r} ({type(e).__name__}: {e})") from None
    return _b64(source, where)


def _maybe_b64(s: str) -> bool:
    return len(s) >= 16 and all(c.isalnum() or c in "+/=\n\r" for c in s[:256])


def _b64(payload: str, where: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as e:
        raise DataError(f"{where}: invalid base64 image data ({e})") from None


def load_image(source: Any, base_dir: Optional[str], where: str):
    """A decoded RGB PIL image (see `image_bytes` for the accepted sources)."""
    from PIL import Image, UnidentifiedImageError

    data = image_bytes(source, base_dir, where)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where}: unreadable image ({type(e).__name__}: {e})") from None
    return img


# ---- sequences -------------------------------------------------------------------------------------------------------
def encode_text(tokenizer: Any, text: str) -> List[int]:
    """Token ids of `text` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_vl_sample(
    segments: Sequence[Segment],
    tokenizer: Any,
    processor: Any,
    token_ids: Mapping[str, int],
    base_dir: Optional[str],
    where: str,
    eos_id: int,
) -> Dict[str, Any]:
    """Model inputs of one image–text sample, shaped like `SyntheticVLDataset.__getitem__` (unbatched tensors:
    `input_ids`, `labels`, `attention_mask`, `mm_token_type_ids`, `moe_mm_token_type_ids` [T], `pixel_values`
    [patches, C·P²], `image_grid_thw` [num_images, 3]).

    `token_ids`: `image_start_token_id`, `image_token_id`, `image_end_token_id` (the model's ids);
    `processor`: an `ErnieImageProcessor` (its merge size sets the placeholder count)."""
    from ernie_platform.models.vl.prompt import num_image_tokens

    start, placeholder, end = (
        int(token_ids["image_start_token_id"]),
        int(token_ids["image_token_id"]),
        int(token_ids["image_end_token_id"]),
    )
    ids: List[int] = []
    labels: List[int] = []
    mm: List[int] = []
    moe: List[int] = []
    pixels, grids = [], []
    for seg in segments:
        if isinstance(seg, ImageRef):
            img = load_image(seg.source, base_dir, where)
            try:
                out = processor(img)
            except Exception as e:  # noqa: BLE001 - any preprocessing failure is a bad record
                raise DataError(f"{where}: cannot preprocess image ({type(e).__name__}: {e})") from None
            grid = out["image_grid_thw"].reshape(-1, 3)
            n = num_image_tokens(grid[0].tolist(), processor.merge_size)
            ids += [start] + [placeholder] * n + [end]
            labels += [IGNORE_INDEX] * (n + 2)
            mm += [0] + [1] * n + [0]
            moe += [1] * (n + 2)
            pixels.append(out["pixel_values"])
            grids.append(grid)
        else:
            text, loss = seg
            tok = encode_text(tokenizer, text)
            ids += tok
            labels += tok if loss else [IGNORE_INDEX] * len(tok)
            mm += [0] * len(tok)
            moe += [0] * len(tok)
    ids.append(int(eos_id))
    labels.append(int(eos_id))
    mm.append(0)
    moe.append(0)
    input_ids = torch.tensor(ids, dtype=torch.long)
    if pixels:
        pixel_values = torch.cat([torch.as_tensor(p) for p in pixels], dim=0)
        grid_thw = torch.cat(grids, dim=0).long()
    else:
        raise DataError(f"{where}: image-text record without images")
    return {
        "input_ids": input_ids,
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": torch.tensor(mm, dtype=torch.long),
        "moe_mm_token_type_ids": torch.tensor(moe, dtype=torch.long),
        "pixel_values": pixel_values,
        "image_grid_thw": grid_thw,
    }


def truncate_vl_sample(
    sample: Dict[str, Any], seq_len: int, image_start_token_id: int, merge_size: int, where: str = "sample"
) -> bool:
    """Cut a sample to at most `seq_len` tokens in place, never through an image: an image that does not fit whole is
    dropped with everything after it (and its pixels). Returns whether anything was cut; `DataError` when not even
    the first image fits."""
    ids = sample["input_ids"]
    if ids.numel() <= seq_len:
        return False
    cut = seq_len
    grid = sample["image_grid_thw"].reshape(-1, 3)
    starts = (ids == image_start_token_id).nonzero().flatten().tolist()
    keep_images = len(starts)
    for k, s in enumerate(starts[: grid.shape[0]]):
        n = int(grid[k].prod()) // (merge_size * merge_size)
        if s + n + 2 > seq_len:  # START + n placeholders + END would not fit
            cut, keep_images = min(cut, s), k
            break
    for key in ("input_ids", "labels", "attention_mask", "mm_token_type_ids", "moe_mm_token_type_ids"):
        sample[key] = sample[key][:cut]
    if keep_images == 0 and grid.shape[0] > 0:
        n = int(grid[0].prod()) // (merge_size * merge_size)
        raise DataError(f"{where}: the first image ends at token {starts[0] + n + 2} > seq_len={seq_len}")
    if keep_images < grid.shape[0]:
        patches = int(grid[:keep_images].prod(-1).sum())
        sample["pixel_values"] = sample["pixel_values"][:patches]
        sample["image_grid_thw"] = grid[:keep_images]
    return True


__all__ = [
    "DataError",
    "DataStats",
    "IGNORE_INDEX",
    "ImageRef",
    "build_vl_sample",
    "encode_text",
    "image_bytes",
    "load_image",
    "parse_row",
    "text_of",
    "truncate_vl_sample",
    "vl_segments",
]
