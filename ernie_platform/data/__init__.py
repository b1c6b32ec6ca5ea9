"""Data: built-in corpora (generated, no download) and, later, the pretraining pipelines."""

from ernie_platform.data.builtin import builtin_text_corpus, packed_token_batches

__all__ = ["builtin_text_corpus", "packed_token_batches"]
