"""Parity with transformers' reference ERNIE 4.5 implementations on checkpoints transformers itself writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Ernie4_5_MoeConfig,
    Ernie4_5_MoeForCausalLM,
    Ernie4_5Config,
    Ernie4_5ForCausalLM,
)

from ernie_platform.models import load_pretrained, save_pretrained

TOL = 1e-4
BASE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
)

CASES = {
    "dense_tied": (Ernie4_5Config, Ernie4_5ForCausalLM, dict(num_hidden_layers=2, tie_word_embeddings=True)),
    "dense_untied_bias": (
        Ernie4_5Config,
        Ernie4_5ForCausalLM,
        dict(num_hidden_layers=2, tie_word_embeddings=False, use_bias=True),
    ),
    "dense_mha_theta": (
        Ernie4_5Config,
        Ernie4_5ForCausalLM,
        dict(num_hidden_layers=2, num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
    ),
    "moe_shared": (
        Ernie4_5_MoeConfig,
        Ernie4_5_MoeForCausalLM,
        dict(num_hidden_layers=3, moe_num_experts=6, moe_k=2, moe_intermediate_size=16, moe_num_shared_experts=2),
    ),
    "moe_topk3_untied_bias": (
        Ernie4_5_MoeConfig,
        Ernie4_5_MoeForCausalLM,
        dict(
            num_hidden_layers=3,
            moe_num_experts=8,
            moe_k=3,
            moe_intermediate_size=16,
            moe_num_shared_experts=1,
            tie_word_embeddings=False,
            use_bias=True,
        ),
    ),
    "moe_every_other_layer": (
        Ernie4_5_MoeConfig,
        Ernie4_5_MoeForCausalLM,
        dict(
            num_hidden_layers=4,
            moe_num_experts=4,
            moe_k=2,
            moe_intermediate_size=16,
            moe_num_shared_experts=0,
            moe_layer_start_index=0,
            moe_layer_interval=2,
        ),
    ),
}


def _make_reference(tmp_path: Path, case: str, randomize_bias: bool = False, **save_kw) -> tuple[torch.nn.Module, Path]:
    cfg_cls, model_cls, kw = CASES[case]
    ref = model_cls(cfg_cls(**{**BASE, **kw})).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "e_score_correction_bias" in name and randomize_bias:
                p.copy_(torch.randn_like(p) * 0.1)
            elif name.endswith("bias") and p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.02)  # non-zero linear biases so use_bias is exercised
    path = tmp_path / case
    ref.save_pretrained(path, **save_kw)
    return ref, path


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 97, (3, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    mask[2, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path: Path, case: str) -> None:
    ref, path = _make_reference(tmp_path, case)
    ours = load_pretrained(path)
    ids, mask = _batch()
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        got = ours(ids).logits
        assert got.shape == (3, 13, 97)
        assert (got - expected).abs().max().item() <= TOL
        # padded batch: real positions agree
        expected_m = ref(input_ids=ids, attention_mask=mask).logits
        got_m = ours(ids, attention_mask=mask).logits
        real = mask.bool()
        assert (got_m[real] - expected_m[real]).abs().max().item() <= TOL


def test_nonzero_score_correction_bias_changes_routing_and_matches(tmp_path: Path) -> None:
    ref, path = _make_reference(tmp_path, "moe_shared", randomize_bias=True)
    ours = load_pretrained(path)
    bias = ours.moe_blocks()[0].gate.e_score_correction_bias
    assert bias.abs().sum() > 0
    ids, _ = _batch()
    with torch.no_grad():
        assert (ours(ids).logits - ref(input_ids=ids).logits).abs().max().item() <= TOL
        load_with_bias = ours(ids).expert_load.clone()
        for blk in ours.moe_blocks():
            blk.gate.e_score_correction_bias.zero_()
        ours(ids)
    # the bias was large enough to move some routing decisions: the check above exercised it
    assert not torch.equal(load_with_bias, ours(ids).expert_load)


def test_sharded_checkpoint(tmp_path: Path) -> None:
    ref, path = _make_reference(tmp_path, "moe_topk3_untied_bias", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*.safetensors"))) > 1
    ours = load_pretrained(path)
    ids, _ = _batch()
    with torch.no_grad():
        assert (ours(ids).logits - ref(input_ids=ids).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("case", ["dense_untied_bias", "moe_topk3_untied_bias", "moe_shared"])
@pytest.mark.parametrize("shard", [False, True])
def test_save_pretrained_loads_in_transformers(tmp_path: Path, case: str, shard: bool) -> None:
    _, path = _make_reference(tmp_path, case, randomize_bias=True)
    ours = load_pretrained(path)
    out = save_pretrained(ours, tmp_path / "ours", max_shard_bytes=30_000 if shard else 5 * 1024**3)
    assert (out / "model.safetensors.index.json").is_file() == shard
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == type(_make_reference(tmp_path / "x", case)[0]).__name__
    ids, _ = _batch()
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - ours(ids).logits).abs().max().item() <= TOL
    # and round-trips through our loader bit-exactly
    again = load_pretrained(out)
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_published_style_config_json(tmp_path: Path) -> None:
    """The published PT checkpoints' config.json: top-level rope_theta plus Paddle-era keys (moe_gate, ...)."""
    ref, path = _make_reference(tmp_path, "moe_shared")
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=500000, moe_capacity=[64, 64, 64], moe_gate="topk", moe_use_aux_free=True, use_rmsnorm=True)
    (path / "config.json").write_text(json.dumps(cfg))
    ours = load_pretrained(path)
    assert ours.args.rope_theta == 500000.0
    ids, _ = _batch()
    with torch.no_grad():
        assert (ours(ids).logits - ref(input_ids=ids).logits).abs().max().item() <= TOL
