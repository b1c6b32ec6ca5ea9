"""Our `MoEBlock` against transformers' `Ernie4_5_MoeSparseMoeBlock` loaded with the same weights: outputs and
gradients (input and parameters), for each of our CPU backends and each of transformers' experts implementations."""

from __future__ import annotations

import pytest
import torch

from ernie_platform.models.config import ErnieModelArgs, MoEConfig
from ernie_platform.models.moe import MoEBlock

hf_moe = pytest.importorskip("transformers.models.ernie4_5_moe.modeling_ernie4_5_moe")
from transformers import Ernie4_5_MoeConfig  # noqa: E402

D = 16  # hidden
F = 8  # expert FFN width
B, S = 2, 5  # T = 10 tokens
ATOL = 1e-5
RTOL = 1e-5

# ours ↔ transformers parameter names
PARAM_MAP = {
    "gate.weight": "gate.weight",
    "w13_E2FD": "experts.gate_up_proj",
    "w2_EDF": "experts.down_proj",
    "shared_experts.gate_proj.weight": "shared_experts.gate_proj.weight",
    "shared_experts.up_proj.weight": "shared_experts.up_proj.weight",
    "shared_experts.down_proj.weight": "shared_experts.down_proj.weight",
}
PARAM_MAP_INV = {v: k for k, v in PARAM_MAP.items()}


def _hf_block(e: int, k: int, shared: int, experts_impl: str) -> torch.nn.Module:
    cfg = Ernie4_5_MoeConfig(
        vocab_size=32,
        hidden_size=D,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        moe_num_experts=e,
        moe_k=k,
        moe_intermediate_size=F,
        moe_num_shared_experts=shared,
        moe_norm_min=1e-12,
        use_bias=False,
    )
    cfg._experts_implementation = experts_impl
    gen = torch.Generator().manual_seed(100 * e + 10 * k + shared)
    block = hf_moe.Ernie4_5_MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            fan_in = p.shape[-1]
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
        # A non-zero score-correction bias of the size of the probability gaps, so it changes the selection.
        block.gate.moe_statics.e_score_correction_bias.copy_(torch.randn(1, e, generator=gen) * 0.1)
    return block


def _our_block(hf: torch.nn.Module, e: int, k: int, shared: int, backend: str) -> MoEBlock:
    args = ErnieModelArgs(
        vocab_size=32,
        hidden_size=D,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        moe_num_experts=e,
        moe_k=k,
        moe_intermediate_size=F,
        moe_num_shared_experts=shared,
    )
    ours = MoEBlock(args, MoEConfig(backend=backend))
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for our_name, p in ours.named_parameters():
            p.copy_(hf_params[PARAM_MAP[our_name]])
        ours.gate.e_score_correction_bias.copy_(hf.gate.moe_statics.e_score_correction_bias)
    assert {n for n, _ in ours.named_parameters()} == {PARAM_MAP_INV[n] for n in hf_params if n in PARAM_MAP_INV}
    return ours


def _forward_backward(block: torch.nn.Module, x: torch.Tensor, param_names: list[str]):
    lx = x.clone().requires_grad_(True)
    y = block(lx)
    cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (y * cot).sum().backward()
    params = dict(block.named_parameters())
    return y.detach(), lx.grad, [params[n].grad for n in param_names]


@pytest.mark.parametrize("experts_impl", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("backend", ["torch", "eager"])
@pytest.mark.parametrize("shared", [0, 2], ids=lambda s: f"shared{s}")
@pytest.mark.parametrize("e, k", [(8, 2), (8, 6)], ids=["E8-k2", "E8-k6"])
def test_moe_block_matches_transformers(e: int, k: int, shared: int, backend: str, experts_impl: str) -> None:
    hf = _hf_block(e, k, shared, experts_impl)
    assert hf.experts.config._experts_implementation == experts_impl
    ours = _our_block(hf, e, k, shared, backend)
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(3))

    # The correction bias must actually matter: the biased top-k differs from the plain one for some token.
    with torch.no_grad():
        probs = torch.softmax(x.reshape(-1, D) @ hf.gate.weight.T, dim=-1)
        bias = hf.gate.moe_statics.e_score_correction_bias
        plain = torch.topk(probs, k, dim=-1).indices.sort(-1).values
        biased = torch.topk(probs + bias, k, dim=-1).indices.sort(-1).values
        assert not torch.equal(plain, biased)

    our_names = [n for n, _ in ours.named_parameters()]
    hf_names = [PARAM_MAP[n] for n in our_names]
    try:
        y_hf, gx_hf, gp_hf = _forward_backward(hf, x, hf_names)
    except (RuntimeError, NotImplementedError) as err:  # an implementation transformers can't run on CPU here
        if experts_impl == "eager":
            raise
        pytest.skip(f"transformers experts implementation {experts_impl!r} fails on CPU: {err}")
    y, gx, gp = _forward_backward(ours, x, our_names)

    assert y.shape == (B, S, D)
    torch.testing.assert_close(y, y_hf, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(gx, gx_hf, rtol=RTOL, atol=ATOL, msg=lambda m: f"grad x: {m}")
    for name, a, b in zip(our_names, gp, gp_hf):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"grad {n}: {m}")
    assert ours.last_expert_load_E.sum().item() == B * S * k
