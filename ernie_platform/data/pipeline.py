"""Pretraining data streams: built-in corpora or files read with Ray Data → sharded, deterministic micro-batches.

Driver side: `read_dataset(data_cfg)` turns `data.source` (paths, directories, globs, fsspec/pyarrow URIs; comma
separated) into an ordered `ray.data.Dataset` whose rows carry their origin (jsonl: `{"path", "line", "raw"}`;
parquet: the file's columns plus `path`). Missing sources fail here with a `DataError` naming them.

Worker side: `make_batches(...)` gives an endless iterator of model kwargs:

* Order and sharding. Rank r keeps the records whose index i in the source order satisfies i % world_size == r
  (built-in: the generated index; files: the row order of the shard iterator, which sees the whole dataset). With
  `data.shuffle`, each rank reorders its records every epoch with an RNG seeded from (seed, epoch, rank): a full
  permutation for built-in data, a `SHUFFLE_BUFFER`-row buffered shuffle for files. Epochs repeat forever; the same
  arguments give the same batches, so a resumed run re-creates the iterator and skips the batches it already used.
* text: documents are tokenized without special tokens, EOS is appended, and the stream is cut into rows of exactly
  `seq_len` tokens (no padding; a document may continue in the next row). Each batch has `input_ids`, `labels`,
  `position_ids` [B, T] and a block-diagonal causal `attention_mask` [B, 1, T, T] (True = attend; B·T² bytes), see
  `pack_documents`.
* vl: image–text samples are *not* packed: one sample per row, right-padded to the longest in the batch
  (`collate_vl`), samples longer than `seq_len` are truncated at the tail without cutting an image (counted in
  `DataStats.truncated`).

Bad file records (invalid JSON, missing field, wrong type, unreadable image) raise `DataError("file:line: ...")`
with `data.on_error=raise`, or are dropped and counted in `DataStats.skipped` with `on_error=skip`.
"""

from __future__ import annotations

import posixpath
import random
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch

from ernie_platform.data.builtin import builtin_text_corpus
from ernie_platform.data.records import (
    IGNORE_INDEX,
    ON_ERROR,
    DataError,
    DataStats,
    build_vl_sample,
    encode_text,
    parse_row,
    text_of,
    truncate_vl_sample,
    vl_segments,
)

SHUFFLE_BUFFER = 4096  # rows held by a file-data rank for its per-epoch shuffle
MAX_SKIPS_IN_A_ROW = 10000  # VL samples dropped as too long before the stream gives up
FILE_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
_VL_KEYS = ("input_ids", "labels", "attention_mask", "mm_token_type_ids", "moe_mm_token_type_ids")
_SEQ_ONLY = {"pixel_values", "image_grid_thw"}


# ---- config access ---------------------------------------------------------------------------------------------------
def _cfg(cfg: Any, key: str, default: Any = None) -> Any:
    """`cfg.key` for a dataclass / DictConfig / mapping."""
    if isinstance(cfg, Mapping):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None else value


def _is_builtin(data_cfg: Any) -> bool:
    return str(_cfg(data_cfg, "source", "builtin")).strip() in ("", "builtin")


# ---- text packing ----------------------------------------------------------------------------------------------------
def document_attention_mask(segment_ids_BT: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [B, 1, T, T] (True = attend): token q sees token k ≤ q of the same segment.

    `segment_ids_BT` labels each token's document; a document is a contiguous run of equal ids (only equality is
    used, so ids must not repeat for two different documents of a row)."""
    if segment_ids_BT.dim() != 2:
        raise ValueError(f"segment_ids must be [B, T], got shape {tuple(segment_ids_BT.shape)}")
    t = segment_ids_BT.shape[1]
    same_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    causal_TT = torch.ones(t, t, dtype=torch.bool, device=segment_ids_BT.device).tril()
    return (same_BTT & causal_TT).unsqueeze(1)


def packed_batch(input_ids_BT: torch.Tensor, doc_start_BT: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Model inputs of packed rows: `doc_start_BT` is True where a document begins (row starts count as starts
    for positions and masks; labels only drop inner starts, whose previous position belongs to another document)."""
    b, t = input_ids_BT.shape
    starts = doc_start_BT.bool().clone()
    starts[:, 0] = True
    segment_ids = starts.long().cumsum(-1)
    idx = torch.arange(t).expand(b, t)
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values
    labels = input_ids_BT.clone()
    inner = doc_start_BT.bool().clone()
    inner[:, 0] = False
    labels[inner] = IGNORE_INDEX
    return {
        "input_ids": input_ids_BT,
        "labels": labels,
        "position_ids": idx - start_idx,
        "attention_mask": document_attention_mask(segment_ids),
    }


def pack_documents(
    docs: Iterable[List[int]], micro_batch_size: int, seq_len: int, stats: Optional[DataStats] = None
) -> Iterator[Dict[str, torch.Tensor]]:
    """Concatenate token documents (each already ending with EOS) and cut them into [B, T] batches (see
    `packed_batch`); the tail that does not fill a batch is dropped when `docs` ends."""
    n = micro_batch_size * seq_len
    ids: List[int] = []
    flags: List[bool] = []
    for doc in docs:
        if not doc:
            continue
        ids.extend(doc)
        flags.append(True)
        flags.extend([False] * (len(doc) - 1))
        while len(ids) >= n:
            chunk, chunk_flags = ids[:n], flags[:n]
            del ids[:n], flags[:n]
            if stats is not None:
                stats.tokens += n
            yield packed_batch(
                torch.tensor(chunk, dtype=torch.long).view(micro_batch_size, seq_len),
                torch.tensor(chunk_flags, dtype=torch.bool).view(micro_batch_size, seq_len),
            )


# ---- record order ----------------------------------------------------------------------------------------------------
def _epoch_rng(seed: int, epoch: int, rank: int) -> random.Random:
    return random.Random(f"ernie_data/{seed}/{epoch}/{rank}")


def rank_indices(num_records: int, rank: int, world_size: int, seed: int, epoch: int, shuffle: bool) -> List[int]:
    """Indices i < num_records with i % world_size == rank, permuted per epoch when `shuffle`."""
    idx = list(range(rank, num_records, world_size))
    if shuffle:
        _epoch_rng(seed, epoch, rank).shuffle(idx)
    return idx


def _buffered_shuffle(items: Iterable[Any], rng: random.Random, size: int) -> Iterator[Any]:
    buf: List[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def _check_shard_args(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")


def _row_origin(row: Mapping[str, Any], counters: Dict[str, int]) -> Tuple[str, int]:
    """(file, 1-based line/row) of a row: jsonl rows carry `line`; parquet rows are counted per file (every rank
    iterates the whole ordered dataset, so the count is the row's index in its file)."""
    path = str(row.get("path", "<unknown>"))
    counters[path] += 1
    line = row.get("line")
    return path, int(line) if line is not None else counters[path]


def _file_rows(
    shard: Any, rank: int, world_size: int, seed: int, shuffle: bool, stats: DataStats
) -> Iterator[Tuple[Mapping[str, Any], str, int]]:
    """Endless (row, file, line) of this rank, epoch after epoch."""
    if shard is None or not hasattr(shard, "iter_rows"):
        raise ValueError("file data needs `shard` (ray.train.get_dataset_shard('train') or a ray.data.Dataset)")
    epoch = 0
    while True:
        stats.epochs += 1
        counters: Dict[str, int] = defaultdict(int)

        def own(counters=counters) -> Iterator[Tuple[Mapping[str, Any], str, int]]:
            for i, row in enumerate(shard.iter_rows()):
                path, line = _row_origin(row, counters)
                if i % world_size == rank:
                    yield row, path, line

        rows = own()
        if shuffle:
            rows = _buffered_shuffle(rows, _epoch_rng(seed, epoch, rank), SHUFFLE_BUFFER)
        produced = 0
        for item in rows:
            produced += 1
            yield item
        if produced == 0:
            raise DataError(f"rank {rank}/{world_size}: the data source has no records for this rank")
        epoch += 1


def _parsed(
    rows: Iterator[Tuple[Mapping[str, Any], str, int]],
    parse: Callable[[Dict[str, Any], str, str], Any],
    on_error: str,
    stats: DataStats,
) -> Iterator[Any]:
    """parse(record, "file:line", record_dir) for each row; bad records raise or are skipped per `on_error`. Fails
    when a whole epoch yields nothing usable (everything skipped)."""
    usable_epoch, last_epoch = 0, None
    for row, path, line in rows:
        if stats.epochs != last_epoch:
            if last_epoch is not None and usable_epoch == 0:
                raise DataError(f"every record of an epoch was skipped as bad (last: {path}:{line})")
            usable_epoch, last_epoch = 0, stats.epochs
        where = f"{path}:{line}"
        stats.records += 1
        try:
            out = parse(parse_row(row, where), where, posixpath.dirname(path))
        except DataError:
            if on_error == "raise":
                raise
            stats.skipped += 1
            continue
        usable_epoch += 1
        yield out


# ---- builtin / file sources ------------------------------------------------------------------------------------------
def _builtin_text_docs(data_cfg: Any, rank: int, world_size: int, seed: int, stats: DataStats) -> Iterator[str]:
    corpus = builtin_text_corpus(int(_cfg(data_cfg, "builtin_docs", 20000)), seed)
    shuffle = bool(_cfg(data_cfg, "shuffle", True))
    epoch = 0
    while True:
        order = rank_indices(len(corpus), rank, world_size, seed, epoch, shuffle)
        if not order:
            raise DataError(f"rank {rank}/{world_size}: data.builtin_docs={len(corpus)} leaves no documents")
        stats.epochs += 1
        for i in order:
            stats.records += 1
            yield corpus[i]
        epoch += 1


def _text_batches(
    data_cfg: Any, tokenizer: Any, b: int, t: int, rank: int, world: int, seed: int, shard: Any, stats: DataStats
) -> Iterator[Dict[str, torch.Tensor]]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id (needed to separate packed documents)")
    if _is_builtin(data_cfg):
        docs: Iterator[str] = _builtin_text_docs(data_cfg, rank, world, seed, stats)
    else:
        key = str(_cfg(data_cfg, "text_key", "text"))
        rows = _file_rows(shard, rank, world, seed, bool(_cfg(data_cfg, "shuffle", True)), stats)
        docs = _parsed(rows, lambda rec, where, _dir: text_of(rec, key, where), _on_error(data_cfg), stats)
    token_docs = (encode_text(tokenizer, d) + [int(eos)] for d in docs)
    return pack_documents(token_docs, b, t, stats)


def _on_error(data_cfg: Any) -> str:
    value = str(_cfg(data_cfg, "on_error", "raise"))
    if value not in ON_ERROR:
        raise ValueError(f"data.on_error must be one of {ON_ERROR}, got {value!r}")
    return value


def _vl_ids(tokenizer: Any, vl_model_cfg: Optional[Mapping[str, Any]]) -> Tuple[Dict[str, int], int, int]:
    """Image token ids (the model's when given; they must match the tokenizer's), merge size and patch size."""
    from ernie_platform.models.vl.prompt import image_token_ids

    tok_ids = image_token_ids(tokenizer)
    vl = dict(vl_model_cfg or {})
    ids = {k: int(vl.get(k, v)) for k, v in tok_ids.items()}
    if ids != tok_ids:
        raise ValueError(f"the model's image token ids {ids} differ from the tokenizer's {tok_ids}")
    return ids, int(vl.get("spatial_merge_size", 2)), int(vl.get("patch_size", 14))


def image_processor_config(patch: int, merge: int, seq_len: int) -> Any:
    """The `ImageProcessorConfig` of VL training on `seq_len`-token sequences: one image may use at most seq_len - 3
    tokens (START/END + EOS), so larger images are resized down to fit. The VL export carries it as its
    `preprocessor_config.json`, so a served model sees images prepared as in training."""
    from ernie_platform.models.vl.image_processing import ImageProcessorConfig

    factor = patch * merge
    default = ImageProcessorConfig(patch_size=patch, merge_size=merge)
    max_pixels = max(default.min_pixels, min(default.max_pixels, (seq_len - 3) * factor * factor))
    return ImageProcessorConfig(patch_size=patch, merge_size=merge, max_pixels=max_pixels)


def _vl_samples(
    data_cfg: Any,
    tokenizer: Any,
    seq_len: int,
    rank: int,
    world: int,
    seed: int,
    shard: Any,
    stats: DataStats,
    vl_model_cfg: Optional[Mapping[str, Any]],
) -> Iterator[Tuple[Dict[str, Any], str]]:
    """Endless (sample, origin) of this rank."""
    from ernie_platform.data.synthetic_vl import SyntheticVLDataset
    from ernie_platform.models.vl.image_processing import ErnieImageProcessor

    ids, merge, patch = _vl_ids(tokenizer, vl_model_cfg)
    shuffle = bool(_cfg(data_cfg, "shuffle", True))
    if _is_builtin(data_cfg):
        ds = SyntheticVLDataset(
            int(_cfg(data_cfg, "builtin_vl_samples", 20000)),
            seed=seed,
            split="train",
            image_size=int(_cfg(data_cfg, "image_size", 56)),
            tokenizer=tokenizer,
            merge_size=merge,
            patch_size=patch,
        )
        epoch = 0
        while True:
            order = rank_indices(len(ds), rank, world, seed, epoch, shuffle)
            if not order:
                raise DataError(f"rank {rank}/{world}: data.builtin_vl_samples={len(ds)} leaves no samples")
            stats.epochs += 1
            for i in order:
                stats.records += 1
                yield ds[i], f"builtin_vl[{i}]"
            epoch += 1
    processor = ErnieImageProcessor(image_processor_config(patch, merge, seq_len))
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id")

    def parse(record: Dict[str, Any], where: str, record_dir: str) -> Tuple[Dict[str, Any], str]:
        segs = vl_segments(record, where)
        return build_vl_sample(segs, tokenizer, processor, ids, record_dir, where, int(eos)), where

    rows = _file_rows(shard, rank, world, seed, shuffle, stats)
    yield from _parsed(rows, parse, _on_error(data_cfg), stats)


def _vl_batches(
    data_cfg: Any,
    tokenizer: Any,
    b: int,
    t: int,
    rank: int,
    world: int,
    seed: int,
    shard: Any,
    stats: DataStats,
    vl_model_cfg: Optional[Mapping[str, Any]],
) -> Iterator[Dict[str, torch.Tensor]]:
    from ernie_platform.data.synthetic_vl import collate_vl

    ids, merge, _ = _vl_ids(tokenizer, vl_model_cfg)
    on_error = _on_error(data_cfg) if not _is_builtin(data_cfg) else "raise"
    pad_id = int(getattr(tokenizer, "pad_token_id", None) or 0)
    batch: List[Dict[str, Any]] = []
    failed_in_a_row = 0
    for sample, where in _vl_samples(data_cfg, tokenizer, t, rank, world, seed, shard, stats, vl_model_cfg):
        sample = {k: v for k, v in sample.items() if k in _VL_KEYS or k in _SEQ_ONLY}
        try:
            if truncate_vl_sample(sample, t, ids["image_start_token_id"], merge, where):
                stats.truncated += 1
        except DataError:
            if on_error == "raise":
                raise
            stats.skipped += 1
            failed_in_a_row += 1
            if failed_in_a_row > MAX_SKIPS_IN_A_ROW:
                raise DataError(f"{failed_in_a_row} samples in a row do not fit seq_len={t} (last: {where})") from None
            continue
        failed_in_a_row = 0
        batch.append(sample)
        if len(batch) == b:
            stats.tokens += sum(int(s["input_ids"].numel()) for s in batch)
            yield collate_vl(batch, pad_id=pad_id)
            batch = []


# ---- public API ------------------------------------------------------------------------------------------------------
def make_batches(
    data_cfg: Any,
    kind: str,
    tokenizer: Any,
    micro_batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shard: Any = None,
    vl_model_cfg: Optional[Mapping[str, Any]] = None,
    stats: Optional[DataStats] = None,
) -> Iterator[Dict[str, torch.Tensor]]:
    """Endless, deterministic micro-batches of this rank (see the module docstring).

    Args:
        data_cfg: the `data` config node (DataConfig, DictConfig or mapping).
        kind: "text" (packed documents) or "vl" (image–text samples, padded per batch, not packed).
        tokenizer: the built-in tokenizer or a transformers tokenizer (needs `eos_token_id`; "vl": the image tokens).
        micro_batch_size, seq_len: B and T (text: exactly [B, T]; vl: [B, ≤T]).
        rank, world_size: this worker's data-parallel rank; rank r keeps records i with i % world_size == r.
        seed: trainer seed (built-in corpus, per-epoch shuffles).
        shard: for file data, `ray.train.get_dataset_shard("train")` (or any object with `iter_rows()` over the
            full dataset of `read_dataset`, e.g. the Dataset itself); None for built-in data.
        vl_model_cfg: for "vl", the model's `image_token_id`, `image_start_token_id`, `image_end_token_id`,
            `patch_size`, `spatial_merge_size`.
        stats: a `DataStats` to update (records, skipped, tokens, truncated, epochs).

    Yields:
        text: `input_ids`, `labels`, `position_ids` [B, T] long and `attention_mask` [B, 1, T, T] bool.
        vl: `ErnieVLForConditionalGeneration.forward` kwargs incl. `labels` (see `collate_vl`).
    """
    if kind not in ("text", "vl"):
        raise ValueError(f"kind must be 'text' or 'vl', got {kind!r}")
    if micro_batch_size < 1 or seq_len < 2:
        raise ValueError(f"need micro_batch_size >= 1 and seq_len >= 2, got {micro_batch_size}, {seq_len}")
    _check_shard_args(rank, world_size)
    if not _is_builtin(data_cfg):
        _on_error(data_cfg)  # validate early
        if shard is None:
            raise ValueError(f"data.source={_cfg(data_cfg, 'source')!r} is files: pass the Ray dataset shard")
    stats = stats if stats is not None else DataStats()
    if kind == "text":
        return _text_batches(data_cfg, tokenizer, micro_batch_size, seq_len, rank, world_size, seed, shard, stats)
    return _vl_batches(
        data_cfg, tokenizer, micro_batch_size, seq_len, rank, world_size, seed, shard, stats, vl_model_cfg
    )


def heldout_vl_dataset(
    data_cfg: Any, tokenizer: Any, seed: int, vl_model_cfg: Optional[Mapping[str, Any]] = None
) -> Any:
    """The built-in held-out image–text split (`SyntheticVLDataset`, split="heldout", `data.heldout_samples`) for
    the answer-accuracy metric; None for file data (no held-out metric)."""
    if not _is_builtin(data_cfg):
        return None
    from ernie_platform.data.synthetic_vl import SyntheticVLDataset

    kwargs: Dict[str, Any] = {}
    if vl_model_cfg:
        _, kwargs["merge_size"], kwargs["patch_size"] = _vl_ids(tokenizer, vl_model_cfg)
    return SyntheticVLDataset(
        int(_cfg(data_cfg, "heldout_samples", 128)),
        seed=seed,
        split="heldout",
        image_size=int(_cfg(data_cfg, "image_size", 56)),
        tokenizer=tokenizer,
        **kwargs,
    )


# ---- driver: files → Ray dataset -------------------------------------------------------------------------------------
def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def resolve_files(source: str) -> List[str]:
    """Files of a comma-separated `data.source` (paths, directories, globs, fsspec URIs), each source's files
    sorted; URIs keep their protocol. Raises `DataError` naming a source that matches nothing."""
    import fsspec

    files: List[str] = []
    for src in (s.strip() for s in str(source).split(",")):
        if not src:
            continue
        try:
            fs, path = fsspec.core.url_to_fs(src)
        except (ImportError, ValueError) as e:
            raise DataError(f"data.source {src!r}: cannot open its filesystem ({e})") from None
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))

        def full(p: str, fs=fs, local=local) -> str:
            return p if local else fs.unstrip_protocol(p)

        if _has_glob(path):
            found = sorted(p for p in fs.glob(path) if fs.isfile(p))
        elif fs.isdir(path):
            found = sorted(p for p in fs.find(path) if posixpath.splitext(p)[1].lower() in FILE_EXTENSIONS)
        elif fs.exists(path):
            found = [path]
        else:
            raise DataError(f"data.source {src!r} does not exist")
        if not found:
            raise DataError(f"data.source {src!r} matches no {'/'.join(sorted(FILE_EXTENSIONS))} files")
        files.extend(full(p) for p in found)
    if not files:
        raise DataError("data.source is empty")
    return files


def _format_of(files: List[str], fmt: str) -> str:
    if fmt not in ("auto", "jsonl", "parquet"):
        raise DataError(f"data.format must be auto, jsonl or parquet, got {fmt!r}")
    if fmt != "auto":
        return fmt
    kinds = set()
    for f in files:
        ext = posixpath.splitext(f)[1].lower()
        if ext not in FILE_EXTENSIONS:
            raise DataError(f"{f}: cannot tell the format from the extension; set data.format (jsonl | parquet)")
        kinds.add(FILE_EXTENSIONS[ext])
    if len(kinds) > 1:
        raise DataError(f"data.source mixes formats {sorted(kinds)}; use one format per run")
    return kinds.pop()


def _strip(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else uri


class _JsonlLines:
    """flat_map: one binary file row → one row per non-blank line `{"path", "line", "raw" (bytes)}`."""

    def __init__(self, uris: Dict[str, str]):
        self.uris = uris

    def __call__(self, row: Dict[str, Any]) -> List[Dict[str, Any]]:
        path = self.uris.get(row["path"], row["path"])
        out = []
        for i, line in enumerate(bytes(row["bytes"]).split(b"\n"), start=1):
            line = line.rstrip(b"\r")
            if line.strip():
                out.append({"path": path, "line": i, "raw": line})
        return out


class _ParquetPath:
    def __init__(self, uris: Dict[str, str]):
        self.uris = uris

    def __call__(self, row: Dict[str, Any]) -> Dict[str, Any]:
        row["path"] = self.uris.get(row["path"], row["path"])
        return row


def read_dataset(data_cfg: Any) -> Any:
    """The `ray.data.Dataset` of a file `data.source` (call in the driver after `ray.init`); sets
    `DataContext.execution_options.preserve_order` so every worker sees the rows in the same order.

    jsonl/.json files (JSON lines; a blank line is skipped) → rows `{"path", "line" (1-based), "raw" (bytes)}`;
    parquet → the file's columns plus `path` (a column of that name is overwritten). Each jsonl file is read whole
    into one row before being split into lines, so keep files to a few hundred MB."""
    import ray.data

    if _is_builtin(data_cfg):
        raise ValueError("read_dataset: data.source is 'builtin' (no files to read)")
    files = resolve_files(str(_cfg(data_cfg, "source")))
    fmt = _format_of(files, str(_cfg(data_cfg, "format", "auto")))
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    uris = {_strip(f): f for f in files}
    if fmt == "jsonl":
        return ray.data.read_binary_files(files, include_paths=True).flat_map(_JsonlLines(uris))
    ds = ray.data.read_parquet(files, include_paths=True)
    if any(k != v for k, v in uris.items()):
        ds = ds.map(_ParquetPath(uris))
    return ds


__all__ = [
    "DataError",
    "DataStats",
    "SHUFFLE_BUFFER",
    "document_attention_mask",
    "heldout_vl_dataset",
    "make_batches",
    "pack_documents",
    "packed_batch",
    "rank_indices",
    "read_dataset",
    "resolve_files",
]
