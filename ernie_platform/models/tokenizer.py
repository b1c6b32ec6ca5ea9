"""Tokenizers: the published one from a checkpoint directory, or the built-in byte-level one (no download).

The built-in tokenizer maps every UTF-8 byte to one token (ids 16..271) after 16 special tokens, so any text encodes
losslessly and the vocabulary fits the small demo models (vocab_size ≥ 272). It is a regular
`PreTrainedTokenizerFast` (a `tokenizers` byte-level BPE with no merges): `save_pretrained` writes a tokenizer.json
that `transformers.AutoTokenizer` reads back, so exports of the demo model are self-contained.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

SPECIAL_TOKENS = [
    "<unk>",  # 0, also padding (pad_token_id=0 as in ERNIE 4.5)
    "<s>",  # 1 bos
    "</s>",  # 2 eos
    "<|begin_of_sentence|>",
    "<|end_of_sentence|>",
    "<|IMAGE_START|>",
    "<|IMAGE_PLACEHOLDER|>",
    "<|IMAGE_END|>",
    "<|VIDEO_START|>",
    "<|VIDEO_END|>",
    "<think>",
    "</think>",
    "<mask:0>",
    "<mask:1>",
    "<mask:2>",
    "<mask:3>",
]
BYTE_OFFSET = len(SPECIAL_TOKENS)
BUILTIN_VOCAB_SIZE = BYTE_OFFSET + 256

# ERNIE 4.5's conversation shape: system text, then "User: …\nAssistant: …" turns closed by <|end_of_sentence|>.
CHAT_TEMPLATE = (
    "{{- '<|begin_of_sentence|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'User: ' + message['content'] + '\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'Assistant: ' + message['content'] + '<|end_of_sentence|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
)


def builtin_tokenizer():
    """The embedded byte-level tokenizer as a transformers `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: BYTE_OFFSET + i for i, ch in enumerate(byte_chars)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=131072,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def load_tokenizer(path: Optional[Union[str, os.PathLike]] = None):
    """transformers' AutoTokenizer for a checkpoint directory (local files only); None → the built-in tokenizer."""
    if path is None:
        return builtin_tokenizer()
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.json, tokenizer_config.json, tokenizer.model)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
