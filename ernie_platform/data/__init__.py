"""Data: built-in corpora (generated, no download) and the pretraining pipelines (built-in or Ray Data files)."""

from ernie_platform.data.builtin import builtin_text_corpus, packed_token_batches
from ernie_platform.data.pipeline import (
    document_attention_mask,
    heldout_vl_dataset,
    make_batches,
    pack_documents,
    packed_batch,
    read_dataset,
    resolve_files,
)
from ernie_platform.data.records import DataError, DataStats
from ernie_platform.data.synthetic_vl import (
    SyntheticVLDataset,
    answer_accuracy,
    chance_accuracy,
    collate_vl,
    generate_samples,
)

__all__ = [
    "DataError",
    "DataStats",
    "SyntheticVLDataset",
    "answer_accuracy",
    "builtin_text_corpus",
    "chance_accuracy",
    "collate_vl",
    "document_attention_mask",
    "generate_samples",
    "heldout_vl_dataset",
    "make_batches",
    "pack_documents",
    "packed_batch",
    "packed_token_batches",
    "read_dataset",
    "resolve_files",
]
