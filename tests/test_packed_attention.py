"""Packed documents in ErnieForCausalLM: a block-diagonal [B, 1, T, T] mask + restarting positions == separate runs."""

from __future__ import annotations

import pytest
import torch

from ernie_platform.data import document_attention_mask, packed_batch
from ernie_platform.models.config import ErnieModelArgs
from ernie_platform.models.ernie import ErnieForCausalLM, causal_lm_loss

TINY_MOE = dict(  # conf/model/ernie45_tiny_moe.yaml
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    moe_num_experts=8,
    moe_k=2,
    moe_intermediate_size=32,
    moe_num_shared_experts=1,
    moe_layer_start_index=1,
    moe_layer_end_index=-1,
    moe_layer_interval=1,
)
DOC_LENS = (5, 7, 4)


@pytest.fixture(scope="module")
def model() -> ErnieForCausalLM:
    torch.manual_seed(0)
    return ErnieForCausalLM(ErnieModelArgs(**TINY_MOE)).eval()


def _packed_row() -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 320, (n,), generator=gen) for n in DOC_LENS]
    starts = torch.zeros(sum(DOC_LENS), dtype=torch.bool)
    offset = 0
    for n in DOC_LENS:
        starts[offset] = True
        offset += n
    return docs, packed_batch(torch.cat(docs)[None], starts[None])


def test_packed_logits_match_separate_documents(model: ErnieForCausalLM) -> None:
    docs, batch = _packed_row()
    assert batch["position_ids"][0].tolist() == [i for n in DOC_LENS for i in range(n)]
    with torch.no_grad():
        packed = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
        offset = 0
        for doc in docs:
            alone = model(doc[None]).logits[0]
            torch.testing.assert_close(packed.logits[0, offset : offset + doc.numel()], alone, atol=1e-5, rtol=0)
            offset += doc.numel()
    # every token is real for the MoE statistics: 2 routed experts per token per MoE layer
    assert packed.expert_load.sum(-1).tolist() == [2.0 * sum(DOC_LENS)] * 2


def test_packed_loss_is_token_weighted_mean_of_document_losses(model: ErnieForCausalLM) -> None:
    docs, batch = _packed_row()
    with torch.no_grad():
        packed = model(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            labels=batch["labels"],
        )
        losses = [causal_lm_loss(model(doc[None]).logits, doc[None]) for doc in docs]
    weights = torch.tensor([n - 1.0 for n in DOC_LENS])
    expected = (torch.stack(losses) * weights).sum() / weights.sum()
    torch.testing.assert_close(packed.lm_loss, expected, atol=1e-5, rtol=1e-5)


def test_mask_shape_errors(model: ErnieForCausalLM) -> None:
    ids = torch.randint(3, 320, (2, 6))
    seg = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    good = document_attention_mask(seg)
    assert good.shape == (2, 1, 6, 6) and good.dtype == torch.bool
    with pytest.raises(ValueError, match=r"\[B, 1, T, T\]"):
        model(ids, attention_mask=good[:, :, :5])
    with pytest.raises(ValueError, match=r"\[B, 1, T, T\]"):
        model(ids, attention_mask=good.long())
    with pytest.raises(ValueError, match="packed documents"):
        model(ids, attention_mask=torch.ones(2, 6, 6, dtype=torch.bool))
