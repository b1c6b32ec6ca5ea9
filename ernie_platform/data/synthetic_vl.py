"""Built-in image–text data for multimodal pretraining: rendered shape scenes with captions and questions.

Nothing is downloaded. A scene is a 2×2 grid of cells on a white canvas; 1–4 cells hold a shape (circle, square,
triangle) in one of four colours (red, green, blue, yellow), drawn with PIL with a little jitter in size, position and
tint. Each sample pairs the image with

* a caption listing the shapes in reading order ("two red circles and a blue square"), and
* one question with a short exact answer, of one of six types (`QUESTION_TYPES`):
  how many {colour} shapes? / how many {shape}s? / how many shapes? (a digit), what colour is the {shape}? (a colour),
  what shape is at the {cell}? (a shape), where is the {colour} {shape}? ("top left", ...).

Sequence layout (built-in byte tokenizer; any tokenizer with the image special tokens works)::

    <|IMAGE_START|> <|IMAGE_PLACEHOLDER|>×N <|IMAGE_END|> "Q: {question} A: " | "{answer}\n{caption}" </s>
    ----------------------------- prompt (labels -100) ----------------------- | --- target (labels = ids) ---

The answer comes before the caption, so the answer depends on the image and question only; the held-out metric
(`answer_accuracy`) feeds the prompt and greedy-decodes the answer up to the newline.

Splits: every sample's RNG is seeded from (split, seed, index), and scenes are partitioned by their layout (which
shape/colour sits in which cell): a held-out layout never occurs in the train split (`scene_split`), so held-out
accuracy measures reading images, not memorised scenes.

Image size: a multiple of 28 (patch 14 × merge 2); the processor keeps it as is. 56×56 → `image_grid_thw` (1, 4, 4)
= 16 patches = 4 image tokens (one per cell); 84×84 → (1, 6, 6) = 9 tokens; 112×112 → (1, 8, 8) = 16 tokens.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageDraw

from ernie_platform.models.vl.image_processing import ErnieImageProcessor, ImageProcessorConfig
from ernie_platform.models.vl.prompt import IMAGE_MARKER, build_mm_inputs

SHAPES = ("circle", "square", "triangle")
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
CELLS = ("top left", "top right", "bottom left", "bottom right")  # reading order; cell k = (row k // 2, col k % 2)
QUESTION_TYPES = ("count_color", "count_shape", "count_all", "color_of", "shape_at", "where")
SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.1  # share of scene layouts reserved for the held-out split
IGNORE_INDEX = -100

_NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}

# One cell: None (empty) or (shape, colour).
Cell = Optional[Tuple[str, str]]


@dataclass(frozen=True)
class Scene:
    """Layout (`cells`, in CELLS order) plus rendering jitter per cell: (dx, dy, size scale, tint)."""

    cells: Tuple[Cell, ...]
    jitter: Tuple[Tuple[float, float, float, int], ...]

    @property
    def shapes(self) -> List[Tuple[str, str, str]]:
        """(shape, colour, cell name) of each occupied cell, in reading order."""
        return [(c[0], c[1], CELLS[k]) for k, c in enumerate(self.cells) if c is not None]


@dataclass(frozen=True)
class VLSample:
    """One generated sample (metadata); `.image` renders the scene."""

    scene: Scene
    caption: str
    question: str
    answer: str
    qtype: str
    image_size: int = 56

    @property
    def image(self) -> Image.Image:
        return render_scene(self.scene, self.image_size)


# ---- scenes ----------------------------------------------------------------------------------------------------------
def scene_split(cells: Sequence[Cell], heldout_fraction: float = HELDOUT_FRACTION) -> str:
    """'heldout' or 'train' for a layout, by a stable hash of it (independent of seeds and PYTHONHASHSEED)."""
    return _scene_split(tuple(None if c is None else tuple(c) for c in cells), float(heldout_fraction))


@functools.lru_cache(maxsize=1 << 16)  # 13^4 layouts at most
def _scene_split(cells: Tuple[Cell, ...], heldout_fraction: float) -> str:
    key = "|".join("-" if c is None else f"{c[0]}:{c[1]}" for c in cells).encode()
    h = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2.0**64
    return "heldout" if h < heldout_fraction else "train"


def random_layout(rng: random.Random, max_shapes: int = 4) -> Tuple[Cell, ...]:
    """1..max_shapes distinct cells, each with a random (shape, colour)."""
    n = rng.randint(1, max_shapes)
    occupied = set(rng.sample(range(len(CELLS)), n))
    colors = list(COLORS)
    return tuple((rng.choice(SHAPES), rng.choice(colors)) if k in occupied else None for k in range(len(CELLS)))


def random_scene(rng: random.Random, max_shapes: int = 4, split: Optional[str] = None) -> Scene:
    """A random scene; with `split`, layouts are redrawn until `scene_split` puts them in that split."""
    cells = random_layout(rng, max_shapes)
    while split is not None and scene_split(cells) != split:
        cells = random_layout(rng, max_shapes)
    jitter = tuple(
        (rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08), rng.uniform(0.8, 1.0), rng.randint(-20, 20))
        for _ in CELLS
    )
    return Scene(cells, jitter)


def render_scene(scene: Scene, image_size: int = 56) -> Image.Image:
    """The scene drawn on a white `image_size`² RGB canvas (deterministic)."""
    img = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    half = image_size / 2
    for k, cell in enumerate(scene.cells):
        if cell is None:
            continue
        shape, color = cell
        dx, dy, scale, tint = scene.jitter[k]
        cx = (k % 2 + 0.5 + dx) * half
        cy = (k // 2 + 0.5 + dy) * half
        r = 0.36 * half * scale
        fill = tuple(max(0, min(255, v + tint)) for v in COLORS[color])
        box = [round(cx - r), round(cy - r), round(cx + r), round(cy + r)]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            s = r * 0.88
            draw.rectangle([round(cx - s), round(cy - s), round(cx + s), round(cy + s)], fill=fill)
        elif shape == "triangle":
            pts = [(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)]
            draw.polygon([(round(x), round(y)) for x, y in pts], fill=fill)
        else:
            raise ValueError(f"unknown shape {shape!r}")
    return img


def caption_of(scene: Scene) -> str:
    """"two red circles and a blue square": (colour, shape) groups in order of first appearance."""
    counts: Dict[Tuple[str, str], int] = {}
    for shape, color, _ in scene.shapes:
        counts[(color, shape)] = counts.get((color, shape), 0) + 1
    parts = [f"{_NUMBER_WORDS[n]} {color} {shape}{'s' if n > 1 else ''}" for (color, shape), n in counts.items()]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def valid_question_types(scene: Scene) -> List[str]:
    shapes = scene.shapes
    kinds = Counter(s for s, _, _ in shapes)
    pairs = Counter((s, c) for s, c, _ in shapes)
    types = ["count_color", "count_shape", "count_all", "shape_at"]
    if any(n == 1 for n in kinds.values()):
        types.append("color_of")
    if any(n == 1 for n in pairs.values()):
        types.append("where")
    return [t for t in QUESTION_TYPES if t in types]


def make_question(scene: Scene, rng: random.Random, qtype: Optional[str] = None) -> Tuple[str, str, str]:
    """(question, answer, qtype) about the scene; `qtype` None → uniform over the valid types."""
    valid = valid_question_types(scene)
    if qtype is None:
        qtype = rng.choice(valid)
    elif qtype not in valid:
        raise ValueError(f"question type {qtype!r} does not apply to this scene (valid: {valid})")
    shapes = scene.shapes
    if qtype == "count_color":
        color = rng.choice([c for _, c, _ in shapes] + list(COLORS))  # about half present, half any colour
        return f"how many {color} shapes?", str(sum(c == color for _, c, _ in shapes)), qtype
    if qtype == "count_shape":
        shape = rng.choice([s for s, _, _ in shapes] + list(SHAPES))
        return f"how many {shape}s?", str(sum(s == shape for s, _, _ in shapes)), qtype
    if qtype == "count_all":
        return "how many shapes?", str(len(shapes)), qtype
    if qtype == "shape_at":
        shape, _, cell = rng.choice(shapes)
        return f"what shape is at the {cell}?", shape, qtype
    if qtype == "color_of":
        kinds = Counter(s for s, _, _ in shapes)
        shape = rng.choice([s for s in SHAPES if kinds[s] == 1])
        color = next(c for s, c, _ in shapes if s == shape)
        return f"what colour is the {shape}?", color, qtype
    pairs = Counter((s, c) for s, c, _ in shapes)
    shape, color, cell = rng.choice([x for x in shapes if pairs[(x[0], x[1])] == 1])
    return f"where is the {color} {shape}?", cell, qtype


def generate_samples(
    num_samples: int, seed: int = 0, split: str = "train", image_size: int = 56, max_shapes: int = 4
) -> List[VLSample]:
    """`num_samples` samples of one split, identical for the same (seed, split); images render lazily."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 1 <= max_shapes <= len(CELLS):
        raise ValueError(f"max_shapes must be in [1, {len(CELLS)}], got {max_shapes}")
    out = []
    for i in range(num_samples):
        rng = random.Random(f"synthetic_vl/{split}/{seed}/{i}")
        scene = random_scene(rng, max_shapes, split)
        question, answer, qtype = make_question(scene, rng)
        out.append(VLSample(scene, caption_of(scene), question, answer, qtype, image_size))
    return out


# ---- dataset ---------------------------------------------------------------------------------------------------------
def prompt_text(question: str) -> str:
    return f"{IMAGE_MARKER}Q: {question} A: "


def target_text(answer: str, caption: str) -> str:
    return f"{answer}\n{caption}"


class SyntheticVLDataset(torch.utils.data.Dataset):
    """Tokenized samples for `ErnieVLForConditionalGeneration` (see the module docstring for the layout).

    `__getitem__` returns unbatched tensors: `input_ids`, `labels`, `attention_mask`, `mm_token_type_ids`,
    `moe_mm_token_type_ids` [T], `pixel_values` [patches, 588], `image_grid_thw` [1, 3], plus `answer`, `question`,
    `caption`, `qtype` (str) and `prompt_length` (int: tokens before the answer). `get(i, with_target=False)` gives
    the prompt alone (what `answer_accuracy` decodes from). Batch with `collate_vl`.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        split: str = "train",
        image_size: int = 56,
        tokenizer: Any = None,
        merge_size: int = 2,
        patch_size: int = 14,
        max_shapes: int = 4,
        samples: Optional[Sequence[VLSample]] = None,
    ):
        factor = patch_size * merge_size
        if image_size < factor or image_size % factor:
            raise ValueError(f"image_size={image_size} must be a positive multiple of patch*merge={factor}")
        if tokenizer is None:
            from ernie_platform.models.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(None)
        self.tokenizer = tokenizer
        self.split, self.seed, self.image_size, self.merge_size = split, seed, image_size, merge_size
        self.processor = ErnieImageProcessor(
            ImageProcessorConfig(
                patch_size=patch_size, merge_size=merge_size, min_pixels=image_size**2, max_pixels=image_size**2
            )
        )
        if samples is None:
            samples = generate_samples(num_samples, seed, split, image_size, max_shapes)
        self.samples: List[VLSample] = list(samples)
        self.eos_id = int(tokenizer.eos_token_id)

    @classmethod
    def from_samples(cls, samples: Sequence[VLSample], **kwargs: Any) -> SyntheticVLDataset:
        """A dataset over given samples (e.g. hand-made ones)."""
        return cls(len(samples), samples=samples, **kwargs)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def tokens_per_image(self) -> int:
        return self.processor.num_image_tokens(self.image_size, self.image_size)

    def _encode(self, text: str) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def get(self, index: int, with_target: bool = True) -> Dict[str, Any]:
        s = self.samples[index]
        pixels = self.processor(render_scene(s.scene, s.image_size))
        inputs = build_mm_inputs(self.tokenizer, prompt_text(s.question), pixels["image_grid_thw"], self.merge_size)
        prompt_ids = inputs["input_ids"][0]
        n_prompt = prompt_ids.numel()
        if with_target:
            target = torch.tensor(self._encode(target_text(s.answer, s.caption)) + [self.eos_id], dtype=torch.long)
        else:
            target = torch.zeros(0, dtype=torch.long)
        input_ids = torch.cat([prompt_ids, target])
        pad = torch.zeros(target.numel(), dtype=torch.long)
        labels = torch.cat([torch.full((n_prompt,), IGNORE_INDEX, dtype=torch.long), target])
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"][0], pad]),
            "moe_mm_token_type_ids": torch.cat([inputs["moe_mm_token_type_ids"][0], pad]),
            "pixel_values": pixels["pixel_values"],
            "image_grid_thw": pixels["image_grid_thw"],
            "prompt_length": n_prompt,
            "answer": s.answer,
            "question": s.question,
            "caption": s.caption,
            "qtype": s.qtype,
        }

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.get(index, with_target=True)


_SEQ_KEYS = {"input_ids": None, "labels": IGNORE_INDEX, "attention_mask": 0, "mm_token_type_ids": 0,
             "moe_mm_token_type_ids": 0}


def collate_vl(samples: Sequence[Mapping[str, Any]], pad_id: int = 0) -> Dict[str, torch.Tensor]:
    """Right-pad the sequences ([B, T_max]; labels with -100, masks/types with 0, ids with `pad_id`) and concatenate
    `pixel_values` / `image_grid_thw` in batch order. Returns model kwargs only (`model(**batch)` works); the
    string fields stay in the samples."""
    if not samples:
        raise ValueError("collate_vl: no samples")
    t_max = max(int(s["input_ids"].numel()) for s in samples)
    batch: Dict[str, torch.Tensor] = {}
    for key, fill in _SEQ_KEYS.items():
        if key not in samples[0]:
            continue
        value = pad_id if fill is None else fill
        out = torch.full((len(samples), t_max), value, dtype=torch.long)
        for b, s in enumerate(samples):
            seq = s[key].reshape(-1)
            out[b, : seq.numel()] = seq
        batch[key] = out
    if "pixel_values" in samples[0]:
        batch["pixel_values"] = torch.cat([s["pixel_values"] for s in samples], dim=0)
        batch["image_grid_thw"] = torch.cat([s["image_grid_thw"].reshape(-1, 3) for s in samples], dim=0)
    return batch


# ---- metrics ---------------------------------------------------------------------------------------------------------
def _first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module, dataset: SyntheticVLDataset, max_new_tokens: Optional[int] = None, batch_size: int = 16
) -> List[str]:
    """Greedy-decoded answer (text up to the first newline / EOS) for every sample, from the prompt alone.

    Re-runs the full forward for each new token (tiny models; no cache). `max_new_tokens` None → the longest answer
    of the dataset plus one (the newline); the byte tokenizer spends one token per character.
    """
    tok = dataset.tokenizer
    if max_new_tokens is None:
        max_new_tokens = max((len(dataset._encode(s.answer)) for s in dataset.samples), default=0) + 1
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers: List[str] = []
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset.get(i, with_target=False) for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collate_vl(items).items() if k != "labels"}
            lengths = batch["attention_mask"].sum(-1)
            b, t = batch["input_ids"].shape
            grow = torch.zeros(b, max_new_tokens, dtype=torch.long, device=device)
            for k in ("input_ids", "attention_mask", "mm_token_type_ids", "moe_mm_token_type_ids"):
                batch[k] = torch.cat([batch[k], grow], dim=1)
            rows = torch.arange(b, device=device)
            new_ids = []
            for _ in range(max_new_tokens):
                width = int(lengths.max())
                step = {k: (v[:, :width] if k in _SEQ_KEYS else v) for k, v in batch.items()}
                logits = model(**step).logits
                nxt = logits[rows, lengths - 1].argmax(-1)
                batch["input_ids"][rows, lengths] = nxt
                batch["attention_mask"][rows, lengths] = 1
                lengths = lengths + 1
                new_ids.append(nxt)
            gen = torch.stack(new_ids, dim=1).tolist() if new_ids else [[] for _ in range(b)]
            for ids in gen:
                if dataset.eos_id in ids:
                    ids = ids[: ids.index(dataset.eos_id)]
                answers.append(_first_line(tok.decode(ids, skip_special_tokens=True)))
    finally:
        model.train(was_training)
    return answers


def answer_accuracy(
    model: torch.nn.Module, dataset: SyntheticVLDataset, max_new_tokens: Optional[int] = None, batch_size: int = 16
) -> float:
    """Exact-match accuracy of greedy answers (see `greedy_answers`) against the samples' answers."""
    if len(dataset) == 0:
        raise ValueError("answer_accuracy: empty dataset")
    preds = greedy_answers(model, dataset, max_new_tokens, batch_size)
    return sum(p == s.answer for p, s in zip(preds, dataset.samples)) / len(dataset)


def _qa_pairs(items: Any) -> List[Tuple[str, str]]:
    items = getattr(items, "samples", items)
    pairs = []
    for it in items:
        if isinstance(it, Mapping):
            pairs.append((str(it["qtype"]), str(it["answer"])))
        elif isinstance(it, tuple) and len(it) == 2:
            pairs.append((str(it[0]), str(it[1])))
        else:
            pairs.append((str(it.qtype), str(it.answer)))
    return pairs


def majority_answers(items: Any) -> Dict[str, str]:
    """Most frequent answer per question type (ties → alphabetically first)."""
    counts: Dict[str, Counter] = defaultdict(Counter)
    for qtype, answer in _qa_pairs(items):
        counts[qtype][answer] += 1
    return {q: min(c, key=lambda a: (-c[a], a)) for q, c in counts.items()}


def chance_accuracy(dataset: Any, reference: Any = None) -> float:
    """Accuracy of always answering the most frequent answer of each question type.

    `dataset`: a SyntheticVLDataset, or an iterable of samples / `__getitem__` dicts / (qtype, answer) pairs. The
    majority answers come from `reference` (e.g. the train split) or, by default, from `dataset` itself (an upper
    bound on what a blind model could score)."""
    pairs = _qa_pairs(dataset)
    if not pairs:
        raise ValueError("chance_accuracy: empty dataset")
    best = majority_answers(dataset if reference is None else reference)
    return sum(best.get(q) == a for q, a in pairs) / len(pairs)


def per_type_accuracy(predictions: Iterable[str], dataset: Any) -> Dict[str, float]:
    """Exact-match accuracy per question type."""
    hits: Dict[str, List[int]] = defaultdict(list)
    for p, (q, a) in zip(predictions, _qa_pairs(dataset)):
        hits[q].append(int(p == a))
    return {q: sum(v) / len(v) for q, v in sorted(hits.items())}


__all__ = [
    "CELLS",
    "COLORS",
    "QUESTION_TYPES",
    "SHAPES",
    "Scene",
    "SyntheticVLDataset",
    "VLSample",
    "answer_accuracy",
    "caption_of",
    "chance_accuracy",
    "collate_vl",
    "generate_samples",
    "greedy_answers",
    "majority_answers",
    "make_question",
    "per_type_accuracy",
    "random_layout",
    "random_scene",
    "render_scene",
    "scene_split",
]
