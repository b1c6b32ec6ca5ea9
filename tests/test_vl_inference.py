"""The inference engine serving a VL model: prompts with images (prefilled one by one, with their 3D-RoPE position
offset kept per KV row) next to text prompts in one continuous batch, greedy tokens equal to transformers'
`generate` on the same weights, and the prefill → decode transfer of an image prompt between two engines."""

from __future__ import annotations

import pytest
import torch

from ernie_platform.inference import Engine, SamplingParams
from ernie_platform.inference.outputs import MMInputs
from ernie_platform.models import load_tokenizer
from tests.test_vl_model import _prompt, make_pair

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def pair():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_pair()
    torch.set_num_threads(n)


def _mm(inputs: dict[str, torch.Tensor]) -> tuple[list[int], MMInputs]:
    return inputs["input_ids"][0].tolist(), MMInputs(
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
        mm_token_type_ids=inputs["mm_token_type_ids"][0].tolist(),
        moe_mm_token_type_ids=inputs["moe_mm_token_type_ids"][0].tolist(),
    )


def _hf_greedy(ref, inputs: dict[str, torch.Tensor]) -> list[int]:
    with torch.no_grad():
        out = ref.generate(
            **inputs, do_sample=False, max_new_tokens=GREEDY.max_tokens, min_new_tokens=GREEDY.max_tokens
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_image_and_text_prompts_in_one_batch_equal_transformers_generate(pair) -> None:
    ref, ours = pair
    engine = Engine(ours, load_tokenizer(None), max_batch_size=4, max_seq_len=64)
    image_a, image_b = _prompt([1, 4, 6]), _prompt([1, 6, 4], before=5, after=2)
    text = torch.randint(3, 50, (1, 7), generator=torch.Generator().manual_seed(5))
    (ids_a, mm_a), (ids_b, mm_b) = _mm(image_a), _mm(image_b)
    for rid, ids, mm in (("a", ids_a, mm_a), ("t", text[0].tolist(), None), ("b", ids_b, mm_b)):
        engine.add_request(rid, ids, GREEDY, mm=mm)
    out: dict[str, list[int]] = {"a": [], "t": [], "b": []}
    while engine.has_work():
        for rid, events in engine.step().items():
            out[rid] += [e.token_id for e in events]
    assert out["a"] == _hf_greedy(ref, image_a)
    assert out["b"] == _hf_greedy(ref, image_b)
    with torch.no_grad():
        hf_text = ref.generate(text, do_sample=False, max_new_tokens=8, min_new_tokens=8)[0, text.shape[1] :].tolist()
    assert out["t"] == hf_text
    assert engine.stats()["prefills_local"] == 3


def test_image_prompt_prefill_transfers_to_a_decode_engine(pair) -> None:
    ref, ours = pair
    tok = load_tokenizer(None)
    prefill, decode = (Engine(ours, tok, max_batch_size=2, max_seq_len=64) for _ in range(2))
    inputs = _prompt([1, 4, 6])
    ids, mm = _mm(inputs)
    result = prefill.prefill(ids, GREEDY, mm)
    assert result.rope_delta != 0  # 6 image tokens on a 2×3 grid take fewer positions than tokens
    decode.add_request("r", result, GREEDY)
    tokens = []
    while decode.has_work():
        tokens += [e.token_id for e in decode.step().get("r", [])]
    assert tokens == _hf_greedy(ref, inputs)


def test_images_for_a_text_model_or_mismatched_types_are_clear_errors(pair, tiny_moe_ckpt) -> None:
    _, ours = pair
    ids, mm = _mm(_prompt([1, 4, 6]))
    text_engine = Engine.from_pretrained(str(tiny_moe_ckpt), max_batch_size=2, max_seq_len=64)
    with pytest.raises(ValueError, match="image inputs, but the served model is a text-only model"):
        text_engine.add_request("x", ids, GREEDY, mm=mm)
    engine = Engine(ours, load_tokenizer(None), max_batch_size=2, max_seq_len=64)
    mm.mm_token_type_ids = mm.mm_token_type_ids[:-1]
    with pytest.raises(ValueError, match=f"mm_token_type_ids has {len(ids) - 1} entries for {len(ids)} prompt tokens"):
        engine.add_request("y", ids, GREEDY, mm=mm)
