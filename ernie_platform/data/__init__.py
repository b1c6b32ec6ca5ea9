"""Data: built-in corpora (generated, no download) and, later, the pretraining pipelines."""

from ernie_platform.data.builtin import builtin_text_corpus, packed_token_batches
from ernie_platform.data.synthetic_vl import (
    SyntheticVLDataset,
    answer_accuracy,
    chance_accuracy,
    collate_vl,
    generate_samples,
)

__all__ = [
    "SyntheticVLDataset",
    "answer_accuracy",
    "builtin_text_corpus",
    "chance_accuracy",
    "collate_vl",
    "generate_samples",
    "packed_token_batches",
]
