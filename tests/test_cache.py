"""Incremental decoding with the KV cache gives the full forward's logits, row by row."""

from __future__ import annotations

import pytest
import torch

from ernie_platform.models import ErnieForCausalLM, ErnieModelArgs, KVCache

ARGS = {
    "dense": ErnieModelArgs(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8,
    ),
    "moe": ErnieModelArgs(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, moe_num_experts=4, moe_k=2, moe_intermediate_size=16,
        moe_num_shared_experts=1, tie_word_embeddings=False,
    ),
}
TOL = 1e-5


def _model(kind: str) -> ErnieForCausalLM:
    return ErnieForCausalLM(ARGS[kind]).eval()


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_prefill_then_decode_matches_full_forward(kind: str) -> None:
    model = _model(kind)
    total = 12
    seqs = torch.randint(3, 64, (3, total))
    prompt_lens = [5, 2, 8]
    with torch.no_grad():
        full = [model(seqs[b : b + 1]).logits[0] for b in range(3)]  # each row alone, no padding
        cache = KVCache.for_model(model, batch_size=3, max_seq_len=16)
        t = max(prompt_lens)
        prompt = torch.zeros(3, t, dtype=torch.long)
        mask = torch.zeros(3, t, dtype=torch.long)
        for b, n in enumerate(prompt_lens):
            prompt[b, :n], mask[b, :n] = seqs[b, :n], 1
        logits = model(prompt, attention_mask=mask, cache=cache).logits
        for b, n in enumerate(prompt_lens):
            assert (logits[b, :n] - full[b][:n]).abs().max().item() <= TOL
        assert cache.lengths_B.tolist() == prompt_lens
        # decode: every row appends its own next token; rows are at different lengths
        pos = list(prompt_lens)
        while min(pos) < total - 1:
            step = torch.tensor([[seqs[b, min(pos[b], total - 1)]] for b in range(3)])
            active = torch.tensor([[1 if pos[b] < total else 0] for b in range(3)])
            out = model(step, attention_mask=active, cache=cache).logits
            for b in range(3):
                if pos[b] < total:
                    assert (out[b, 0] - full[b][pos[b]]).abs().max().item() <= TOL, (b, pos[b])
                    pos[b] += 1
        assert cache.lengths_B.tolist() == pos


def test_chunked_prefill_matches_full_forward() -> None:
    model = _model("moe")
    seqs = torch.randint(3, 64, (2, 10))
    with torch.no_grad():
        full = model(seqs).logits
        cache = KVCache.for_model(model, batch_size=2, max_seq_len=10)
        a = model(seqs[:, :4], cache=cache).logits
        b = model(seqs[:, 4:7], cache=cache).logits
        c = model(seqs[:, 7:], cache=cache).logits
    got = torch.cat([a, b, c], dim=1)
    assert (got - full).abs().max().item() <= TOL


def test_greedy_decode_equals_argmax_of_full_forward() -> None:
    model = _model("dense")
    prompt = torch.randint(3, 64, (2, 4))
    with torch.no_grad():
        cache = KVCache.for_model(model, batch_size=2, max_seq_len=12)
        logits = model(prompt, cache=cache).logits[:, -1]
        seq = prompt
        for _ in range(6):
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            logits = model(nxt, cache=cache).logits[:, -1]
        full = model(seq).logits
    assert torch.equal(full[:, 3:-1].argmax(-1), seq[:, 4:])


def test_cache_overflow_and_batch_mismatch_are_clear_errors() -> None:
    model = _model("dense")
    cache = KVCache.for_model(model, batch_size=2, max_seq_len=4)
    with pytest.raises(ValueError, match="max_seq_len=4"):
        model(torch.randint(3, 64, (2, 5)), cache=cache)
    with pytest.raises(ValueError, match="3 rows"):
        model(torch.randint(3, 64, (3, 2)), cache=cache)
