"""Analytic parameter / FLOP counts against built modules and the published ERNIE 4.5 sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ernie_platform.models import ErnieForCausalLM, ErnieModelArgs, count_params, flops_per_token

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"


def _tiny(**overrides) -> ErnieModelArgs:
    kw = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        moe_num_experts=4,
        moe_k=2,
        moe_intermediate_size=16,
        moe_num_shared_experts=1,
    )
    kw.update(overrides)
    return ErnieModelArgs(**kw)


def _module_params(args: ErnieModelArgs, device: str = "cpu") -> int:
    with torch.device(device):
        model = ErnieForCausalLM(args)
    return sum(p.numel() for p in model.parameters())  # parameters() de-duplicates a tied lm_head


def _preset(name: str) -> ErnieModelArgs:
    d = yaml.safe_load((CONF_MODEL / f"{name}.yaml").read_text())
    for key in ("defaults", "name", "path"):
        d.pop(key, None)
    return ErnieModelArgs.from_mapping(d)


TINY_CONFIGS = {
    "dense_tied": dict(moe_num_experts=0),
    "dense_untied": dict(moe_num_experts=0, tie_word_embeddings=False),
    "dense_bias": dict(moe_num_experts=0, use_bias=True),
    "dense_bias_untied_no_head_dim": dict(moe_num_experts=0, use_bias=True, tie_word_embeddings=False, head_dim=None),
    "moe_tied": dict(),
    "moe_untied": dict(tie_word_embeddings=False),
    "moe_bias": dict(use_bias=True),
    "moe_bias_untied": dict(use_bias=True, tie_word_embeddings=False),
    "moe_no_shared": dict(moe_num_shared_experts=0),
    "moe_two_shared_bias": dict(moe_num_shared_experts=2, use_bias=True),
    "moe_every_other": dict(num_hidden_layers=5, moe_layer_interval=2, moe_layer_start_index=0),
    "moe_every_other_bias_no_shared": dict(
        num_hidden_layers=6, moe_layer_interval=2, use_bias=True, moe_num_shared_experts=0
    ),
    "moe_k1_end_index": dict(num_hidden_layers=4, moe_k=1, moe_layer_end_index=2),
    "moe_k_eq_e": dict(moe_k=4),
}


def _hand_count(args: ErnieModelArgs) -> tuple[int, int]:
    """(total, active) written out independently from the architecture description."""
    d, hd, v = args.hidden_size, args.resolved_head_dim, args.vocab_size
    h, hk = args.num_attention_heads, args.num_key_value_heads
    b = args.use_bias
    total = active = v * d + d  # embedding, final norm
    if not args.tie_word_embeddings:
        total += v * d
        active += v * d
    if b and args.is_moe:
        total += v
        active += v
    for i in range(args.num_hidden_layers):
        q, k, vv, o = d * h * hd, d * hk * hd, d * hk * hd, h * hd * d
        layer = q + k + vv + o + 2 * d
        if b:
            layer += h * hd + 2 * hk * hd + d
        total += layer
        active += layer
        if (
            args.is_moe
            and i % args.moe_layer_interval == args.moe_layer_interval - 1
            and (args.moe_layer_start_index <= i <= args.resolved_moe_layer_end_index)
        ):
            f = args.moe_intermediate_size
            fs = f * args.moe_num_shared_experts
            shared = (3 * d * fs + ((2 * fs + d) if b else 0)) if fs else 0
            router = args.moe_num_experts * d
            total += router + shared + args.moe_num_experts * 3 * d * f
            active += router + shared + args.moe_k * 3 * d * f
        else:
            f = args.intermediate_size
            mlp = 3 * d * f + ((2 * f + d) if b else 0)
            total += mlp
            active += mlp
    return total, active


@pytest.mark.parametrize("overrides", list(TINY_CONFIGS.values()), ids=list(TINY_CONFIGS))
def test_count_params_matches_built_module(overrides) -> None:
    args = _tiny(**overrides)
    counts = count_params(args)
    assert counts.total == _module_params(args)
    total, active = _hand_count(args)
    assert (counts.total, counts.active) == (total, active)
    assert counts.total == counts.total_non_embedding + counts.embedding
    assert counts.active == counts.active_non_embedding + counts.embedding
    head = 0 if args.tie_word_embeddings else args.vocab_size * args.hidden_size
    assert counts.embedding == args.vocab_size * args.hidden_size + head


def test_router_bias_is_a_buffer_not_a_parameter() -> None:
    model = ErnieForCausalLM(_tiny())
    names = {n for n, _ in model.named_parameters()}
    buffers = {n for n, _ in model.named_buffers()}
    assert not any("e_score_correction_bias" in n for n in names)
    assert sum("e_score_correction_bias" in n for n in buffers) == 2


def test_tied_head_shares_storage() -> None:
    model = ErnieForCausalLM(_tiny(moe_num_experts=0))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = _tiny(moe_num_experts=0, tie_word_embeddings=False)
    assert count_params(untied).total - count_params(_tiny(moe_num_experts=0)).total == 64 * 32


@pytest.mark.parametrize(
    "overrides, n_moe_layers",
    [
        (dict(), 2),
        (dict(moe_k=1, moe_num_shared_experts=0), 2),
        (dict(num_hidden_layers=6, moe_layer_interval=2), 3),  # layers 1, 3, 5
        (dict(num_hidden_layers=5, moe_layer_interval=2, moe_layer_start_index=0, use_bias=True), 2),  # 1, 3
        (dict(moe_k=4), 2),
    ],
)
def test_active_params_differ_by_unused_experts(overrides, n_moe_layers) -> None:
    args = _tiny(**overrides)
    assert sum(args.is_moe_layer(i) for i in range(args.num_hidden_layers)) == n_moe_layers
    c = count_params(args)
    d, f, e, k = args.hidden_size, args.moe_intermediate_size, args.moe_num_experts, args.moe_k
    assert c.total - c.active == n_moe_layers * (e - k) * 3 * d * f
    assert c.total_non_embedding - c.active_non_embedding == n_moe_layers * (e - k) * 3 * d * f


def test_dense_active_equals_total() -> None:
    c = count_params(_tiny(moe_num_experts=0))
    assert c.total == c.active and c.total_non_embedding == c.active_non_embedding


# ---- published sizes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ernie45_0p3b", "ernie45_21b_a3b", "ernie45_300b_a47b"])
def test_published_configs_module_count_on_meta(name: str) -> None:
    args = _preset(name)
    assert count_params(args).total == _module_params(args, device="meta")
    assert count_params(args).total == _hand_count(args)[0]


def test_preset_loading_agrees_with_hydra_conversion() -> None:
    from omegaconf import OmegaConf

    from ernie_platform.configs import to_model_args

    for name in ("ernie45_0p3b", "ernie45_21b_a3b", "ernie45_300b_a47b"):
        via_hydra = to_model_args(OmegaConf.load(CONF_MODEL / f"{name}.yaml"))
        assert count_params(via_hydra) == count_params(_preset(name))


def _within(value: float, target: float, rel: float = 0.03) -> bool:
    return abs(value - target) <= rel * target


def test_ernie45_0p3b_size() -> None:
    c = count_params(_preset("ernie45_0p3b"))
    assert _within(c.total, 0.36e9), c
    assert c.active == c.total


def test_ernie45_21b_a3b_size() -> None:
    c = count_params(_preset("ernie45_21b_a3b"))
    assert _within(c.total_non_embedding, 21e9), c
    assert _within(c.active_non_embedding, 3e9), c


def test_ernie45_300b_a47b_size() -> None:
    c = count_params(_preset("ernie45_300b_a47b"))
    assert _within(c.total, 300e9), c
    assert _within(c.active, 47e9), c


# ---- FLOPs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ernie45_tiny_dense", "ernie45_tiny_moe", "ernie45_21b_a3b", "ernie45_300b_a47b"])
def test_flops_training_is_three_times_inference_and_grows_with_seq_len(name: str) -> None:
    args = _preset(name)
    previous = 0.0
    for seq_len in (128, 1024, 4096, 32768):
        fwd = flops_per_token(args, seq_len, training=False)
        train = flops_per_token(args, seq_len, training=True)
        assert train == pytest.approx(3 * fwd, rel=1e-12)
        assert fwd > previous
        previous = fwd
    # attention term is linear in seq_len: equal increments for equal steps
    f1, f2, f3 = (flops_per_token(args, s, training=False) for s in (1000, 2000, 3000))
    assert f2 - f1 == pytest.approx(f3 - f2, rel=1e-9)
    assert f2 - f1 > 0


@pytest.mark.parametrize("tied", [True, False])
def test_flops_tiny_by_hand(tied: bool) -> None:
    args = _tiny(tie_word_embeddings=tied)
    v, d = args.vocab_size, args.hidden_size
    _, active = _hand_count(args)
    # active weights without the input table (and untied head), plus the output head's matmul; then QKᵀ and AV
    # at 2·2·L·H·Dh·S.
    matmul = active - v * d * (1 if tied else 2) + v * d
    seq = 16
    expected_fwd = 2 * matmul + 4 * 3 * 4 * 8 * seq
    assert flops_per_token(args, seq, training=False) == pytest.approx(expected_fwd)
    assert flops_per_token(args, seq) == pytest.approx(3 * expected_fwd)
