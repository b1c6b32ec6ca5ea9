"""Pretraining data pipeline: packing, determinism, sharding, resume; Ray Data files (jsonl / parquet); VL records."""

from __future__ import annotations

import base64
import io
import itertools
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from ernie_platform.data import (
    DataError,
    DataStats,
    builtin_text_corpus,
    heldout_vl_dataset,
    make_batches,
    read_dataset,
)
from ernie_platform.data.pipeline import rank_indices
from ernie_platform.models import load_tokenizer

TOK = load_tokenizer(None)
EOS = TOK.eos_token_id
VL_CFG = dict(
    image_token_id=TOK.convert_tokens_to_ids("<|IMAGE_PLACEHOLDER|>"),
    image_start_token_id=TOK.convert_tokens_to_ids("<|IMAGE_START|>"),
    image_end_token_id=TOK.convert_tokens_to_ids("<|IMAGE_END|>"),
    patch_size=14,
    spatial_merge_size=2,
)


def _take(it, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(it, n))


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def _stream(batches: list[dict]) -> list[int]:
    return torch.cat([b["input_ids"].reshape(-1) for b in batches]).tolist()


def _docs_of(stream: list[int]) -> list[str]:
    """Decoded EOS-terminated documents of a token stream (the unterminated tail is dropped)."""
    docs, cur = [], []
    for tid in stream:
        if tid == EOS:
            docs.append(TOK.decode(cur))
            cur = []
        else:
            cur.append(tid)
    return docs


def _encode(doc: str) -> list[int]:
    return TOK(doc, add_special_tokens=False)["input_ids"] + [EOS]


# ---- packing ---------------------------------------------------------------------------------------------------------
def test_packing_layout_positions_mask_labels() -> None:
    cfg = {"source": "builtin", "builtin_docs": 50, "shuffle": False}
    stats = DataStats()
    batches = _take(make_batches(cfg, "text", TOK, 3, 48, 0, 1, 7, stats=stats), 4)
    for b in batches:
        assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape == (3, 48)
        assert b["attention_mask"].shape == (3, 1, 48, 48) and b["attention_mask"].dtype == torch.bool
        assert all(b[k].dtype == torch.long for k in ("input_ids", "labels", "position_ids"))
        for ids, pos, lab, mask in zip(b["input_ids"], b["position_ids"], b["labels"], b["attention_mask"][:, 0]):
            ids = ids.tolist()
            starts = [j == 0 or ids[j - 1] == EOS for j in range(48)]  # a document starts after every EOS
            assert [p == 0 for p in pos.tolist()] == starts
            assert [lab[j].item() == -100 for j in range(48)] == [s and j > 0 for j, s in enumerate(starts)]
            assert all(lab[j].item() == ids[j] for j in range(48) if not (starts[j] and j > 0))
            seg = list(itertools.accumulate(int(s) for s in starts))
            ref = torch.tensor([[k <= q and seg[k] == seg[q] for k in range(48)] for q in range(48)])
            assert torch.equal(mask, ref)
    # no padding: the rows are the tokenized corpus (+EOS) cut into consecutive pieces
    expected = [t for doc in builtin_text_corpus(50, 7) for t in _encode(doc)]
    assert _stream(batches) == expected[: 4 * 3 * 48]
    assert stats.tokens == 4 * 3 * 48 and stats.records > 0 and stats.skipped == 0


def test_determinism_and_resume_across_epochs() -> None:
    cfg = {"source": "builtin", "builtin_docs": 12, "shuffle": True}
    args = ("text", TOK, 2, 64, 1, 2, 3)
    stats = DataStats()
    first = _take(make_batches(cfg, *args, stats=stats), 12)
    assert stats.epochs >= 2  # wraps around the 6 documents of this rank
    assert _same(first, _take(make_batches(cfg, *args), 12))
    resumed = make_batches(cfg, *args)
    _take(resumed, 5)  # discard the batches already used
    assert _same(first[5:], _take(resumed, 7))
    assert not _same(first, _take(make_batches(cfg, "text", TOK, 2, 64, 1, 2, 4), 12))  # another seed


def test_sharding_disjoint_and_covering() -> None:
    for shuffle in (False, True):
        for epoch in (0, 1):
            parts = [rank_indices(23, r, 3, 5, epoch, shuffle) for r in range(3)]
            assert sorted(i for p in parts for i in p) == list(range(23))
            assert all(i % 3 == r for r, p in enumerate(parts) for i in p)
    assert rank_indices(23, 0, 3, 5, 0, True) != rank_indices(23, 0, 3, 5, 1, True)  # reshuffled per epoch
    # stream level: each rank packs exactly its documents, in order
    corpus = builtin_text_corpus(10, 0)
    cfg = {"source": "builtin", "builtin_docs": 10, "shuffle": False}
    for rank in range(2):
        docs = _docs_of(_stream(_take(make_batches(cfg, "text", TOK, 2, 64, rank, 2, 0), 40)))
        assert docs[:5] == corpus[rank::2] and docs[5:10] == corpus[rank::2]


# ---- VL (built-in) ---------------------------------------------------------------------------------------------------
def _check_vl_batch(b: dict[str, torch.Tensor], merge: int = 2) -> None:
    placeholders = (b["input_ids"] == VL_CFG["image_token_id"]).sum(-1)
    per_image = b["image_grid_thw"].prod(-1) // (merge * merge)
    assert placeholders.sum() == per_image.sum() == b["pixel_values"].shape[0] // (merge * merge)
    assert b["labels"][b["mm_token_type_ids"] == 1].eq(-100).all()
    assert b["labels"].shape == b["input_ids"].shape == b["attention_mask"].shape


def test_builtin_vl_batches_and_heldout() -> None:
    cfg = {"source": "builtin", "builtin_vl_samples": 40, "heldout_samples": 6, "image_size": 56}
    stats = DataStats()
    batches = _take(make_batches(cfg, "vl", TOK, 4, 128, 0, 2, 0, vl_model_cfg=VL_CFG, stats=stats), 2)
    for b in batches:
        assert b["input_ids"].shape[0] == 4 and b["input_ids"].shape[1] <= 128
        assert b["image_grid_thw"].tolist() == [[1, 4, 4]] * 4
        _check_vl_batch(b)
    assert _same(batches, _take(make_batches(cfg, "vl", TOK, 4, 128, 0, 2, 0, vl_model_cfg=VL_CFG), 2))
    assert stats.records == 8
    # truncation keeps the image
    short = next(make_batches(cfg, "vl", TOK, 2, 12, 0, 1, 0, vl_model_cfg=VL_CFG, stats=stats))
    assert short["input_ids"].shape == (2, 12) and stats.truncated == 2
    _check_vl_batch(short)
    held = heldout_vl_dataset(cfg, TOK, 0)
    assert held.split == "heldout" and len(held) == 6 and held[0]["input_ids"].numel() > 0
    assert heldout_vl_dataset({"source": "/data/x.jsonl"}, TOK, 0) is None


# ---- files via Ray Data ----------------------------------------------------------------------------------------------
def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _files_cfg(source, **kw) -> dict:
    return {"source": str(source), "format": "auto", "text_key": "text", "on_error": "raise", "shuffle": False} | kw


@pytest.mark.integration
def test_jsonl_text_roundtrip_errors_and_skip(ray_local, tmp_path: Path) -> None:
    docs = [f"document number {i} says hello." for i in range(7)]
    d = tmp_path / "corpus"
    d.mkdir()
    _write_jsonl(d / "a.jsonl", [{"text": t} for t in docs[:4]])
    (d / "b.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(docs[4:])) + "\n\n")
    (d / "notes.txt").write_text("ignored")
    ds = read_dataset(_files_cfg(d))
    stats = DataStats()
    got = _docs_of(_stream(_take(make_batches(_files_cfg(d), "text", TOK, 2, 32, 0, 1, 0, ds, stats=stats), 8)))
    assert got[:7] == docs and got[7:14] == docs[: len(got) - 7]
    assert stats.records >= 7 and stats.skipped == 0
    # two ranks over the same (full) dataset: disjoint, together the whole stream, shuffled per epoch
    for shuffle in (False, True):
        cfg = _files_cfg(d, shuffle=shuffle)
        per_rank = [_docs_of(_stream(_take(make_batches(cfg, "text", TOK, 1, 32, r, 2, 0, ds), 4))) for r in (0, 1)]
        if not shuffle:
            assert per_rank[0][:4] == docs[0::2] and per_rank[1][:3] == docs[1::2]
        assert sorted(per_rank[0][:4] + per_rank[1][:3]) == sorted(docs)

    bad = _write_jsonl(
        tmp_path / "bad.jsonl", [{"text": "fine one"}, {"text": "fine two"}, "{not json", {"body": "x"}, {"text": 3}]
    )
    ds_bad = read_dataset(_files_cfg(bad))
    with pytest.raises(DataError, match=f"{bad}:3: invalid JSON"):
        _take(make_batches(_files_cfg(bad), "text", TOK, 1, 8, 0, 1, 0, ds_bad), 4)
    no_key = _write_jsonl(tmp_path / "nokey.jsonl", [{"text": "ok"}, {"body": "x"}])
    with pytest.raises(DataError, match=f"{no_key}:2: missing field 'text'"):
        _take(make_batches(_files_cfg(no_key), "text", TOK, 1, 8, 0, 1, 0, read_dataset(_files_cfg(no_key))), 4)
    stats = DataStats()
    skip_cfg = _files_cfg(bad, on_error="skip")
    out = _take(make_batches(skip_cfg, "text", TOK, 1, 8, 0, 1, 0, ds_bad, stats=stats), 3)
    assert len(out) == 3 and set(_docs_of(_stream(out))) == {"fine one", "fine two"}
    assert stats.skipped == 3 and stats.as_dict()["skipped"] == 3

    with pytest.raises(DataError, match="does-not-exist"):
        read_dataset(_files_cfg(tmp_path / "does-not-exist.jsonl"))
    with pytest.raises(DataError, match="nothing"):
        read_dataset(_files_cfg(f"{bad},{tmp_path}/nothing*.jsonl"))


@pytest.mark.integration
def test_parquet_text_source(ray_local, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["alpha beta", "gamma", "delta epsilon zeta"]
    pq.write_table(pa.table({"content": docs[:1] + [None] + docs[1:]}), tmp_path / "part-0.parquet")
    cfg = _files_cfg(f"file://{tmp_path}/*.parquet", text_key="content")
    ds = read_dataset(cfg)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/part-0.parquet:2: field 'content' must be a string")):
        _take(make_batches(cfg, "text", TOK, 1, 16, 0, 1, 0, ds), 4)
    stats = DataStats()
    skip_cfg = cfg | {"on_error": "skip"}
    stream = _stream(_take(make_batches(skip_cfg, "text", TOK, 1, 16, 0, 1, 0, ds, stats=stats), 2))
    assert stream == [t for doc in docs for t in _encode(doc)][:32]  # one epoch: the None row is skipped
    assert stats.skipped == 1 and stats.records == 4


# ---- VL files --------------------------------------------------------------------------------------------------------
def _png(color: tuple[int, int, int], size: tuple[int, int] = (56, 84)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.integration
def test_vl_jsonl_erniekit_and_simple_records(ray_local, tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "red.png").write_bytes(_png((255, 0, 0)))
    b64 = base64.b64encode(_png((0, 0, 255), (56, 56))).decode()
    records = [
        {  # image file (relative to the jsonl) before the "mask" question, answer trained on
            "image_info": [{"image_url": "imgs/red.png", "matched_text_index": 0}],
            "text_info": [{"text": "what colour? ", "tag": "mask"}, {"text": "red", "tag": "no_mask"}],
        },
        {  # base64 data URI, two images
            "image_info": [
                {"image_url": f"data:image/png;base64,{b64}", "matched_text_index": 0},
                {"image_url": "imgs/red.png", "matched_text_index": 1},
            ],
            "text_info": [{"text": "first ", "tag": "no_mask"}, {"text": "second", "tag": "mask"}],
        },
        {"image": b64, "prompt": "Q: colour? A: ", "answer": "blue"},
        {"image": "imgs/red.png", "text": "a red picture"},
    ]
    src = _write_jsonl(tmp_path / "vl.jsonl", records)
    cfg = _files_cfg(src)
    stats = DataStats()
    (b,) = _take(make_batches(cfg, "vl", TOK, 4, 256, 0, 1, 0, read_dataset(cfg), VL_CFG, stats), 1)
    _check_vl_batch(b)
    # 56 wide, 84 high → grid (1, 6, 4) → 6 tokens; 56x56 → (1, 4, 4) → 4 tokens
    assert b["image_grid_thw"].tolist() == [[1, 6, 4], [1, 4, 4], [1, 6, 4], [1, 4, 4], [1, 6, 4]]
    assert (b["input_ids"] == VL_CFG["image_token_id"]).sum(-1).tolist() == [6, 10, 4, 6]

    def trained_text(row: int) -> str:
        lab = b["labels"][row]
        return TOK.decode(lab[(lab != -100) & (lab != EOS)].tolist())

    assert trained_text(0) == "red" and trained_text(1) == "first " and trained_text(2) == "blue"
    assert trained_text(3) == "a red picture"
    assert all(b["labels"][r][b["attention_mask"][r].sum() - 1] == EOS for r in range(4))  # EOS has loss
    assert stats.records == 4 and stats.skipped == 0

    broken = _write_jsonl(
        tmp_path / "broken.jsonl",
        [
            records[0],
            {"image": "imgs/missing.png", "text": "x"},
            {"image": base64.b64encode(b"nope" * 8).decode(), "text": "y"},
        ],
    )
    bcfg = _files_cfg(broken)
    ds = read_dataset(bcfg)
    with pytest.raises(DataError, match=f"{broken}:2: cannot read image"):
        _take(make_batches(bcfg, "vl", TOK, 2, 256, 0, 1, 0, ds, VL_CFG), 1)
    stats = DataStats()
    (b,) = _take(make_batches(bcfg | {"on_error": "skip"}, "vl", TOK, 2, 256, 0, 1, 0, ds, VL_CFG, stats), 1)
    _check_vl_batch(b)
    assert stats.skipped == 2  # the missing file and the undecodable image
    bytes_only = _write_jsonl(
        tmp_path / "garbage.jsonl", [{"image": base64.b64encode(b"nope" * 8).decode(), "text": "y"}]
    )
    with pytest.raises(DataError, match=f"{bytes_only}:1: unreadable image"):
        _take(
            make_batches(
                _files_cfg(bytes_only), "vl", TOK, 1, 256, 0, 1, 0, read_dataset(_files_cfg(bytes_only)), VL_CFG
            ),
            1,
        )
