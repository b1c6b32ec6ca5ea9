from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ernie_platform.models import load_tokenizer
from ernie_platform.models.tokenizer import BUILTIN_VOCAB_SIZE, BYTE_OFFSET


def test_builtin_is_lossless_byte_level() -> None:
    tok = load_tokenizer(None)
    text = "Hello wörld, 你好 😀\n\ttabs  and  spaces"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8"))
    assert ids[0] == BYTE_OFFSET + ord("H")
    assert tok.decode(ids) == text
    assert len(tok) == BUILTIN_VOCAB_SIZE and max(ids) < BUILTIN_VOCAB_SIZE
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_special_tokens_and_chat_template() -> None:
    tok = load_tokenizer(None)
    assert tok.encode("<|IMAGE_START|>", add_special_tokens=False) == [tok.convert_tokens_to_ids("<|IMAGE_START|>")]
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt == "<|begin_of_sentence|>Be brief.\nUser: 2+2?\nAssistant: "


def test_save_and_autotokenizer_roundtrip(tmp_path: Path) -> None:
    tok = load_tokenizer(None)
    tok.save_pretrained(tmp_path)
    for other in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)):
        assert other.encode("ab 😀", add_special_tokens=False) == tok.encode("ab 😀", add_special_tokens=False)
        assert other.chat_template == tok.chat_template


def test_missing_tokenizer_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
