"""Built-in synthetic image–text data: determinism, splits, label masking, collation, a tiny VL model, metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from ernie_platform.configs import register_configs, to_vl_config
from ernie_platform.data.synthetic_vl import (
    IGNORE_INDEX,
    QUESTION_TYPES,
    Scene,
    SyntheticVLDataset,
    VLSample,
    answer_accuracy,
    caption_of,
    chance_accuracy,
    collate_vl,
    generate_samples,
    greedy_answers,
    majority_answers,
    scene_split,
)
from ernie_platform.models.vl.grow import init_vl_weights
from ernie_platform.models.vl.model import ErnieVLForConditionalGeneration

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
IMAGE_START, IMAGE_TOKEN, IMAGE_END = 5, 6, 7


@pytest.fixture(scope="module")
def tiny_vl() -> ErnieVLForConditionalGeneration:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=["model=ernie45_tiny_vl"])
    torch.manual_seed(0)
    model = ErnieVLForConditionalGeneration(to_vl_config(cfg.model))
    init_vl_weights(model)
    return model


@pytest.fixture(scope="module")
def train_ds() -> SyntheticVLDataset:
    return SyntheticVLDataset(64, seed=0, split="train")


def test_same_seed_same_samples() -> None:
    a, b = SyntheticVLDataset(8, seed=3), SyntheticVLDataset(8, seed=3)
    for i in range(8):
        x, y = a[i], b[i]
        assert x["answer"] == y["answer"] and x["caption"] == y["caption"] and x["question"] == y["question"]
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["pixel_values"], y["pixel_values"])
        assert np.array_equal(np.array(a.samples[i].image), np.array(b.samples[i].image))
    c = SyntheticVLDataset(8, seed=4)
    assert [s.scene for s in a.samples] != [s.scene for s in c.samples]


def test_splits_are_disjoint() -> None:
    train = generate_samples(400, seed=0, split="train")
    heldout = generate_samples(100, seed=0, split="heldout")
    assert all(scene_split(s.scene.cells) == "train" for s in train)
    assert all(scene_split(s.scene.cells) == "heldout" for s in heldout)
    assert not {s.scene.cells for s in train} & {s.scene.cells for s in heldout}
    assert {s.qtype for s in heldout} == set(QUESTION_TYPES)
    with pytest.raises(ValueError, match="split"):
        generate_samples(1, split="test")


def test_image_and_grid(train_ds: SyntheticVLDataset) -> None:
    item = train_ds[0]
    img = train_ds.samples[0].image
    assert img.size == (56, 56) and img.mode == "RGB"
    assert item["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert item["pixel_values"].shape == (16, 588)
    assert train_ds.tokens_per_image == 4 == int((item["input_ids"] == IMAGE_TOKEN).sum())
    assert SyntheticVLDataset(1, image_size=84).tokens_per_image == 9
    with pytest.raises(ValueError, match="image_size"):
        SyntheticVLDataset(1, image_size=60)


def test_caption_and_answers() -> None:
    red, blue = ("circle", "red"), ("square", "blue")
    jitter = ((0.0, 0.0, 1.0, 0),) * 4
    scene = Scene((red, red, None, blue), jitter)
    assert caption_of(scene) == "two red circles and a blue square"
    for s in generate_samples(200, seed=1):
        shapes = s.scene.shapes
        if s.qtype == "count_all":
            assert s.answer == str(len(shapes))
        elif s.qtype == "where":
            assert any(cell == s.answer for _, _, cell in shapes)
        elif s.qtype == "color_of":
            shape = s.question.split()[-1].rstrip("?")
            assert [c for sh, c, _ in shapes if sh == shape] == [s.answer]


def test_labels_only_on_answer_and_caption(train_ds: SyntheticVLDataset) -> None:
    tok = train_ds.tokenizer
    for i in range(8):
        item = train_ds[i]
        ids, labels, n = item["input_ids"], item["labels"], item["prompt_length"]
        assert ids.shape == labels.shape == item["attention_mask"].shape == item["mm_token_type_ids"].shape
        is_image = (ids == IMAGE_START) | (ids == IMAGE_TOKEN) | (ids == IMAGE_END)
        assert (labels[is_image] == IGNORE_INDEX).all()
        assert (labels[:n] == IGNORE_INDEX).all() and (labels[n:] == ids[n:]).all()
        assert tok.decode(ids[:n]).endswith(f"Q: {item['question']} A: ")
        assert tok.decode(labels[n:]) == f"{item['answer']}\n{item['caption']}</s>"
        assert (item["mm_token_type_ids"] == (ids == IMAGE_TOKEN).long()).all()
        assert (item["moe_mm_token_type_ids"] == is_image.long()).all()
        prompt = train_ds.get(i, with_target=False)
        assert torch.equal(prompt["input_ids"], ids[:n])


def test_collate_shapes(train_ds: SyntheticVLDataset) -> None:
    items = [train_ds[i] for i in range(4)]
    batch = collate_vl(items)
    lengths = [x["input_ids"].numel() for x in items]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["pixel_values"].shape == (4 * 16, 588)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 4
    assert torch.equal(batch["pixel_values"][16:32], items[1]["pixel_values"])
    for b, n in enumerate(lengths):
        assert batch["attention_mask"][b].sum() == n
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all() and (batch["input_ids"][b, n:] == 0).all()
        assert torch.equal(batch["labels"][b, :n], items[b]["labels"])
    assert set(batch) == {"input_ids", "labels", "attention_mask", "mm_token_type_ids", "moe_mm_token_type_ids",
                          "pixel_values", "image_grid_thw"}


def test_tiny_vl_forward_backward(tiny_vl: ErnieVLForConditionalGeneration, train_ds: SyntheticVLDataset) -> None:
    tiny_vl.train()
    batch = collate_vl([train_ds[i] for i in range(4)])
    out = tiny_vl(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in tiny_vl.model.vision_tower.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    tiny_vl.zero_grad(set_to_none=True)


def test_padding_does_not_change_greedy_answers(tiny_vl: ErnieVLForConditionalGeneration) -> None:
    ds = SyntheticVLDataset(6, seed=0, split="heldout")
    batched = greedy_answers(tiny_vl, ds, max_new_tokens=3, batch_size=6)
    single = greedy_answers(tiny_vl, ds, max_new_tokens=3, batch_size=1)
    assert batched == single
    acc = answer_accuracy(tiny_vl, ds, batch_size=3)
    assert 0.0 <= acc <= 1.0


def test_answer_accuracy_counts_exact_matches(tiny_vl: ErnieVLForConditionalGeneration) -> None:
    ds = SyntheticVLDataset(4, seed=0, split="heldout")
    preds = greedy_answers(tiny_vl, ds, max_new_tokens=3)
    samples = [VLSample(s.scene, s.caption, s.question, p if k < 2 else p + "x", s.qtype)
               for k, (s, p) in enumerate(zip(ds.samples, preds))]
    rigged = SyntheticVLDataset.from_samples(samples)
    assert answer_accuracy(tiny_vl, rigged, max_new_tokens=3) == pytest.approx(0.5)


def test_chance_accuracy_hand_made() -> None:
    pairs = [("count_all", "1"), ("count_all", "1"), ("count_all", "2"), ("where", "top left"),
             ("where", "top right"), ("where", "top right"), ("where", "bottom left"), ("color_of", "red")]
    # majority: count_all → "1" (2/3), where → "top right" (2/4), color_of → "red" (1/1)
    assert chance_accuracy(pairs) == pytest.approx(5 / 8)
    assert majority_answers(pairs) == {"count_all": "1", "where": "top right", "color_of": "red"}
    # majority taken from a reference set
    assert chance_accuracy(pairs, reference=[("count_all", "2"), ("where", "bottom left")]) == pytest.approx(2 / 8)
    ds = SyntheticVLDataset(50, seed=0, split="heldout")
    assert chance_accuracy(ds) == chance_accuracy([ds[i] for i in range(len(ds))])
    assert 0.0 < chance_accuracy(ds) < 0.6


def test_adamw_reduces_loss_on_fixed_batch(train_ds: SyntheticVLDataset) -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=["model=ernie45_tiny_vl"])
    torch.manual_seed(1)
    model = ErnieVLForConditionalGeneration(to_vl_config(cfg.model))
    init_vl_weights(model)
    model.train()
    batch = collate_vl([train_ds[i] for i in range(8)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(**batch)
        losses.append(out.lm_loss.item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert losses[-1] < 0.6 * losses[0], losses
