"""Post-training pieces that need no Ray: where the policy starts, weights for rollout sync, RL batches and losses."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from ernie_platform.models import ErnieForCausalLM, ErnieModelArgs, save_pretrained
from ernie_platform.posttrain import algorithms as algos
from ernie_platform.posttrain.lora import LoRAConfig, apply_lora, merge_lora
from ernie_platform.posttrain.policy import merged_state_dict, newest_export, reference_of, start_of
from ernie_platform.posttrain.rollout import Rollout
from tests.conftest import TINY_MOE_ARGS


def _tiny() -> ErnieForCausalLM:
    torch.manual_seed(0)
    return ErnieForCausalLM(ErnieModelArgs(**TINY_MOE_ARGS))


def test_newest_text_export_wins_and_vl_or_own_exports_are_skipped(tmp_path: Path) -> None:
    old = save_pretrained(_tiny(), tmp_path / "old" / "export")
    new = save_pretrained(_tiny(), tmp_path / "new" / "export")
    os.utime(old / "config.json", (time.time() - 100, time.time() - 100))
    vl = tmp_path / "vl" / "export"
    vl.mkdir(parents=True)
    (vl / "config.json").write_text(json.dumps({"model_type": "ernie4_5_moe_vl"}))
    assert newest_export(str(tmp_path)) == str(new)
    assert newest_export(str(tmp_path), exclude=str(new)) == str(old)
    assert newest_export(str(tmp_path / "nothing")) is None
    cfg = {"model": {"path": None, "name": "demo"}, "run": {"storage_path": str(tmp_path)}}
    assert start_of(cfg, str(new)).path == str(old)
    cfg["model"]["path"] = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        start_of(cfg, "")


def test_merged_state_dict_of_flat_buffer_views_pickles_to_the_model_size() -> None:
    """DeepSpeed ZeRO-1/2 turn the parameters into views of one flat buffer; the rollout weights must not pickle that
    buffer once per tensor (ray.put of the views of a 72 MB model was a 5 GB object)."""
    import pickle

    model = _tiny()
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:  # as DeepSpeed's _update_model_bit16_weights does
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    state = merged_state_dict(model)
    size = sum(t.numel() * t.element_size() for t in state.values())
    assert len(pickle.dumps(state)) < 1.2 * size + 100_000
    for name, t in model.state_dict().items():
        torch.testing.assert_close(state[name], t)


def test_merged_state_dict_equals_the_merged_model_and_loads_into_a_plain_one() -> None:
    model = _tiny()
    apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B is zero at init: make the adapters matter
    state = merged_state_dict(model)
    plain = _tiny()
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state)
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        adapted = model.eval()(ids).logits
        torch.testing.assert_close(plain.eval()(ids).logits, adapted, rtol=1e-4, atol=1e-4)
        merged = merge_lora(model)
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_lora_reference_is_the_base_model_and_restores_training_mode() -> None:
    model = _tiny()
    base_ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        base = model.eval()(base_ids).logits
    apply_lora(model, LoRAConfig(r=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    model.train()
    with torch.no_grad(), reference_of(model, None) as ref:
        assert not ref.training
        torch.testing.assert_close(ref(base_ids).logits, base)
    assert model.training
    with torch.no_grad():
        assert not torch.allclose(model.eval()(base_ids).logits, base)


def _rollout(prompt: list[int], out: list[int]) -> Rollout:
    return Rollout(0, prompt, out, "x", "stop")


def test_rl_batch_labels_only_the_completion_and_advantages_are_group_relative() -> None:
    groups = [[_rollout([5, 6, 7], [8, 2]), _rollout([5, 6, 7], [9])], [_rollout([4], [3, 3, 2]), _rollout([4], [1])]]
    batch = algos.rl_batch(groups, [[1.0, 0.0], [0.5, 0.5]], {"normalize_std": True})
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 2], [5, 6, 7, 9, 0], [4, 3, 3, 2, 0], [4, 1, 0, 0, 0]]
    assert batch.labels.tolist() == [
        [-100, -100, -100, 8, 2],
        [-100, -100, -100, 9, -100],
        [-100, 3, 3, 2, -100],
        [-100, 1, -100, -100, -100],
    ]
    assert batch.attention_mask.sum(-1).tolist() == [5, 4, 4, 2]
    # group 1: rewards 1, 0 → ±(0.5 / std) with the unbiased std 0.7071; group 2: equal rewards → 0
    torch.testing.assert_close(batch.advantages_B, torch.tensor([0.70710, -0.70710, 0.0, 0.0]), atol=1e-4, rtol=0)


def test_rl_loss_is_zero_gradient_free_for_equal_rewards_and_pushes_up_the_better_completion() -> None:
    model = _tiny().train()
    algo = {
        "name": "rlvr", "clip_low": 0.2, "clip_high": 0.2, "loss_agg": "token_mean", "kl_coef": 0.0,
        "kl_kind": "k3", "normalize_std": True, "upo_coef": 0.0, "upo_pairs": "online", "beta": 0.1,
    }  # fmt: skip
    good, bad = [20, 21, 2], [30, 31, 2]
    groups = [[_rollout([5, 6], good), _rollout([5, 6], bad)]]
    batch = algos.rl_batch(groups, [[1.0, 0.0]], algo)
    feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def seq_logps() -> torch.Tensor:
        with torch.no_grad():
            _, logp, mask = algos._forward_logps(model, feed)
        return (logp * mask).sum(-1)

    before = seq_logps()
    loss, metrics = algos.rl_loss(model, None, batch, algo)
    assert metrics["clip_fraction"] == 0.0 and abs(metrics["ratio_mean"] - 1.0) < 1e-6  # on-policy: ratio 1
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = seq_logps()
    assert after[0] > before[0] and after[1] < before[1]


def test_engine_stops_at_the_chat_end_of_turn_token() -> None:
    """ERNIE's chat template closes assistant turns with <|end_of_sentence|>, not the tokenizer's eos (</s>): a chat
    answer (and an RL rollout) must end there."""
    from ernie_platform.inference import Engine
    from ernie_platform.inference.engine import end_of_turn_ids
    from ernie_platform.models import load_tokenizer

    tok = load_tokenizer(None)
    eot = tok.convert_tokens_to_ids("<|end_of_sentence|>")
    assert end_of_turn_ids(tok) == {eot} and eot != tok.eos_token_id
    engine = Engine(_tiny(), tok, max_batch_size=2, max_seq_len=32)
    assert {tok.eos_token_id, eot} <= engine.eos_token_ids
