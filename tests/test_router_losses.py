"""Router, router losses and aux-loss-free bias balancing of the ERNIE 4.5 MoE block, checked by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ernie_platform.models import ErnieForCausalLM, ErnieModelArgs, MoEConfig
from ernie_platform.models.moe import (
    MoEBlock,
    Router,
    load_balance_loss,
    router_orthogonal_loss,
    router_z_loss,
)

E, K = 4, 2


def _args(**overrides) -> ErnieModelArgs:
    kw = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        moe_num_experts=E,
        moe_k=K,
        moe_intermediate_size=16,
        moe_num_shared_experts=1,
    )
    kw.update(overrides)
    return ErnieModelArgs(**kw)


def _model(moe_cfg: MoEConfig | None = None, seed: int = 0) -> ErnieForCausalLM:
    torch.manual_seed(seed)
    model = ErnieForCausalLM(_args(), moe_cfg or MoEConfig())
    # Larger router weights than the 0.02 init so routing is decisive and the losses are clearly non-trivial.
    with torch.no_grad():
        for blk in model.moe_blocks():
            blk.gate.weight.normal_(std=0.5)
    return model


def _capture_gates(model: ErnieForCausalLM) -> list[list[tuple[torch.Tensor, ...]]]:
    """Forward hooks recording each MoE layer's router outputs (logits, probs, topk_idx, topk_w)."""
    records: list[list[tuple[torch.Tensor, ...]]] = []
    for blk in model.moe_blocks():
        rec: list[tuple[torch.Tensor, ...]] = []
        blk.gate.register_forward_hook(lambda _m, _i, out, rec=rec: rec.append(tuple(o.detach() for o in out)))
        records.append(rec)
    return records


# ---- load balance ----------------------------------------------------------------------------------------------


def _hand_load_balance(probs: list[list[float]], idx: list[list[int]]) -> float:
    t, e = len(probs), len(probs[0])
    pairs = [i for row in idx for i in row]
    f = [pairs.count(j) / len(pairs) for j in range(e)]
    p = [sum(probs[r][j] for r in range(t)) / t for j in range(e)]
    return e * sum(fj * pj for fj, pj in zip(f, p))


def test_load_balance_k1_by_hand() -> None:
    probs = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.7, 0.2, 0.1]]
    idx = [[0], [1], [2], [0]]
    # f = [1/2, 1/4, 1/4], P = [0.375, 0.325, 0.3] → 3 · (0.1875 + 0.08125 + 0.075) = 1.03125
    assert _hand_load_balance(probs, idx) == pytest.approx(1.03125)
    got = load_balance_loss(torch.tensor(probs), torch.tensor(idx))
    assert got.shape == ()
    assert got.item() == pytest.approx(1.03125, rel=1e-6)


def test_load_balance_k2_by_hand() -> None:
    probs = [[0.6, 0.3, 0.1], [0.5, 0.2, 0.3], [0.4, 0.4, 0.2]]
    idx = [[0, 1], [0, 2], [0, 1]]
    # f = [3/6, 2/6, 1/6], P = [0.5, 0.3, 0.2] → 3 · (0.25 + 0.1 + 1/30) = 1.15
    assert _hand_load_balance(probs, idx) == pytest.approx(1.15)
    got = load_balance_loss(torch.tensor(probs), torch.tensor(idx))
    assert got.item() == pytest.approx(1.15, rel=1e-6)


def test_load_balance_random_matches_hand_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(9, 5, generator=gen), -1)
    idx = torch.topk(torch.rand(9, 5, generator=gen), 2, dim=-1).indices
    expected = _hand_load_balance(probs.tolist(), idx.tolist())
    assert load_balance_loss(probs, idx).item() == pytest.approx(expected, rel=1e-6)


def test_load_balance_uniform_is_exactly_one() -> None:
    probs = torch.full((4, 4), 0.25)
    idx = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    assert load_balance_loss(probs, idx).item() == 1.0
    # and a collapsed router (everything to expert 0 with prob 1) gives E
    collapsed = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 4)
    assert load_balance_loss(collapsed, torch.zeros(4, 1, dtype=torch.long)).item() == pytest.approx(4.0)


# ---- z-loss ----------------------------------------------------------------------------------------------------


def test_router_z_loss_by_hand() -> None:
    logits = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 4.0]]
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits]
    expected = sum(v * v for v in lse) / len(lse)
    assert lse[1] == pytest.approx(math.log(3))
    assert router_z_loss(torch.tensor(logits)).item() == pytest.approx(expected, rel=1e-6)


# ---- orthogonal loss -------------------------------------------------------------------------------------------


def test_orthogonal_loss_zero_for_orthonormal_rows() -> None:
    assert router_orthogonal_loss(torch.eye(3, 5)).item() == pytest.approx(0.0, abs=1e-7)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    assert router_orthogonal_loss(q[:6]).item() == pytest.approx(0.0, abs=1e-6)


def test_orthogonal_loss_identical_rows_by_hand() -> None:
    # Normalised Gram is all ones: ‖G − I‖² = 2 off-diagonal ones, / E² = 0.5
    assert router_orthogonal_loss(torch.tensor([[1.0, 2.0], [1.0, 2.0]])).item() == pytest.approx(0.5, rel=1e-6)
    # Rows at 60°: off-diagonal cos = 0.5 → 2 · 0.25 / 4 = 0.125
    w = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    assert router_orthogonal_loss(w).item() == pytest.approx(0.125, rel=1e-6)


def test_orthogonal_loss_is_row_scale_invariant() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(5, 7, generator=gen)
    scales = torch.tensor([0.01, 3.0, 1.0, 100.0, 0.5]).unsqueeze(-1)
    base = router_orthogonal_loss(w)
    assert base.item() > 0.01
    assert router_orthogonal_loss(w * scales).item() == pytest.approx(base.item(), rel=1e-5)
    # independent reference: cosines between rows
    rows = w.tolist()
    norms = [math.sqrt(sum(v * v for v in r)) for r in rows]
    total = 0.0
    for i in range(5):
        for j in range(5):
            cos = sum(a * b for a, b in zip(rows[i], rows[j])) / (norms[i] * norms[j])
            total += (cos - (1.0 if i == j else 0.0)) ** 2
    assert base.item() == pytest.approx(total / 25, rel=1e-5)


# ---- Router ----------------------------------------------------------------------------------------------------


def _hand_route(logits: list[float], bias: list[float], k: int) -> tuple[list[int], list[float]]:
    m = max(logits)
    ex = [math.exp(v - m) for v in logits]
    probs = [v / sum(ex) for v in ex]
    chosen = sorted(range(len(probs)), key=lambda j: probs[j] + bias[j], reverse=True)[:k]
    denom = sum(probs[j] for j in chosen)
    return chosen, [probs[j] / denom for j in chosen]


def _identity_router(num_experts: int, k: int, bias: list[float]) -> Router:
    router = Router(hidden_size=num_experts, num_experts=num_experts, top_k=k, norm_min=1e-12)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))  # logits = x
        router.e_score_correction_bias.copy_(torch.tensor([bias]))
    return router


def test_router_bias_selects_but_does_not_weight() -> None:
    x = torch.tensor([[2.0, 1.0, 0.5, 0.0], [0.0, 3.0, 1.0, 2.5]])
    bias = [0.0, 0.0, 0.0, 10.0]  # forces expert 3 into every top-2
    logits, probs, idx, w = _identity_router(4, 2, bias)(x)
    torch.testing.assert_close(logits, x)
    torch.testing.assert_close(probs, torch.softmax(x, -1))
    for row in range(2):
        chosen, weights = _hand_route(x[row].tolist(), bias, 2)
        assert idx[row].tolist() == chosen
        assert idx[row, 0].item() == 3
        assert w[row].tolist() == pytest.approx(weights, rel=1e-6)
        assert w[row].sum().item() == pytest.approx(1.0, rel=1e-6)
    # Row 0: chosen {3, 0}; weights are the *unbiased* p3/(p0+p3), p0/(p0+p3), not anything involving the bias.
    p = [math.exp(v) for v in (2.0, 1.0, 0.5, 0.0)]
    assert w[0].tolist() == pytest.approx([p[3] / (p[0] + p[3]), p[0] / (p[0] + p[3])], rel=1e-6)


def test_router_bias_magnitude_does_not_change_weights() -> None:
    x = torch.tensor([[2.0, 1.0, 0.5, 0.0], [0.3, -1.0, 1.2, 0.1]])
    _, _, idx_a, w_a = _identity_router(4, 2, [0.0, 0.0, 0.0, 5.0])(x)
    _, _, idx_b, w_b = _identity_router(4, 2, [0.0, 0.0, 0.0, 50.0])(x)
    assert torch.equal(idx_a, idx_b)
    torch.testing.assert_close(w_a, w_b, rtol=0, atol=0)
    # A bias that leaves the selection unchanged leaves the weights equal to the unbiased router's.
    _, _, idx0, w0 = _identity_router(4, 2, [0.0] * 4)(x)
    _, _, idx_c, w_c = _identity_router(4, 2, [0.01, 0.0, 0.01, -0.01])(x)
    assert torch.equal(torch.sort(idx0).values, torch.sort(idx_c).values)
    torch.testing.assert_close(torch.sort(w_c).values, torch.sort(w0).values, rtol=0, atol=0)


def test_router_random_against_manual_softmax_topk() -> None:
    gen = torch.Generator().manual_seed(3)
    t, d, e, k = 16, 8, 6, 3
    router = Router(hidden_size=d, num_experts=e, top_k=k, norm_min=1e-12)
    bias = (torch.randn(e, generator=gen) * 0.2).tolist()
    with torch.no_grad():
        router.weight.copy_(torch.randn(e, d, generator=gen))
        router.e_score_correction_bias.copy_(torch.tensor([bias]))
    x = torch.randn(t, d, generator=gen)
    _, _, idx, w = router(x)
    assert idx.shape == (t, k) and w.shape == (t, k)
    differs = 0
    for row in range(t):
        logits = [sum(a * b for a, b in zip(x[row].tolist(), router.weight[j].tolist())) for j in range(e)]
        chosen, weights = _hand_route(logits, bias, k)
        unbiased, _ = _hand_route(logits, [0.0] * e, k)
        differs += set(chosen) != set(unbiased)
        assert idx[row].tolist() == chosen
        assert w[row].tolist() == pytest.approx(weights, rel=1e-5)
    assert differs > 0  # the bias really changed some selections


# ---- aux-loss-free bias update ---------------------------------------------------------------------------------


def test_moe_block_update_bias() -> None:
    blk = MoEBlock(_args(), MoEConfig())
    blk.gate.e_score_correction_bias.zero_()
    blk.load_since_update_E.copy_(torch.tensor([5.0, 1.0, 3.0, 3.0]))  # mean 3
    blk.update_bias(0.1)
    assert blk.gate.e_score_correction_bias.shape == (1, E)
    assert blk.gate.e_score_correction_bias[0].tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])
    assert torch.all(blk.load_since_update_E == 0)
    # nothing accumulated since: no change
    blk.update_bias(0.1)
    assert blk.gate.e_score_correction_bias[0].tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])
    # accumulates on top of the current bias
    blk.load_since_update_E.copy_(torch.tensor([0.0, 0.0, 8.0, 0.0]))
    blk.update_bias(0.5)
    assert blk.gate.e_score_correction_bias[0].tolist() == pytest.approx([0.4, 0.6, -0.5, 0.5])


def test_model_update_expert_bias_all_layers_and_default_rate() -> None:
    model = _model(MoEConfig(bias_update_rate=0.25))
    blocks = model.moe_blocks()
    assert len(blocks) == 2  # layer 0 dense, layers 1-2 MoE
    for blk in blocks:
        blk.load_since_update_E.copy_(torch.tensor([5.0, 1.0, 3.0, 3.0]))
    model.update_expert_bias(0.1)
    for blk in blocks:
        assert blk.gate.e_score_correction_bias[0].tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])
        assert torch.all(blk.load_since_update_E == 0)
        blk.load_since_update_E.copy_(torch.tensor([1.0, 5.0, 3.0, 3.0]))
    model.update_expert_bias()  # moe_cfg.bias_update_rate
    for blk in blocks:
        assert blk.gate.e_score_correction_bias[0].tolist() == pytest.approx([-0.1 + 0.25, 0.1 - 0.25, 0.0, 0.0])


def test_train_forward_accumulates_expert_load() -> None:
    model = _model()
    model.train()
    records = _capture_gates(model)
    b, t = 2, 5
    ids = torch.randint(1, 64, (b, t), generator=torch.Generator().manual_seed(0))
    out = model(ids)
    assert out.expert_load is not None and out.expert_load.shape == (2, E)
    assert out.expert_load.sum(-1).tolist() == [b * t * K] * 2
    for blk, rec, row in zip(model.moe_blocks(), records, out.expert_load):
        expected = torch.bincount(rec[-1][2].reshape(-1), minlength=E)
        assert row.tolist() == expected.tolist()
        assert blk.load_since_update_E.tolist() == expected.float().tolist()
    first = [blk.load_since_update_E.clone() for blk in model.moe_blocks()]
    out2 = model(ids.flip(-1))
    for blk, before, row in zip(model.moe_blocks(), first, out2.expert_load):
        assert blk.load_since_update_E.sum().item() == 2 * b * t * K
        torch.testing.assert_close(blk.load_since_update_E, before + row.float())
    model.update_expert_bias(0.1)
    for blk in model.moe_blocks():
        assert blk.load_since_update_E.sum().item() == 0
        assert blk.gate.e_score_correction_bias.abs().sum().item() > 0


def test_padding_is_excluded_from_expert_load() -> None:
    model = _model()
    model.train()
    records = _capture_gates(model)
    b, t = 2, 6
    ids = torch.randint(1, 64, (b, t), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 4:] = 0
    mask[0, 5:] = 0
    real = int(mask.sum())
    assert real == 9
    out = model(ids, attention_mask=mask)
    assert out.expert_load.sum(-1).tolist() == [real * K] * 2
    keep = mask.reshape(-1).bool()
    for blk, rec, row in zip(model.moe_blocks(), records, out.expert_load):
        expected = torch.bincount(rec[-1][2][keep].reshape(-1), minlength=E)
        assert row.tolist() == expected.tolist()
        assert blk.load_since_update_E.sum().item() == real * K


# ---- router loss in the model's output -------------------------------------------------------------------------


def _ref_router_losses(records, gate_weights, keep_T=None) -> dict[str, float]:
    """Per layer from the captured router outputs, written independently of the library; mean over layers."""
    lb, z, orth = [], [], []
    for rec, weight in zip(records, gate_weights):
        logits, probs, idx, _ = rec[-1]
        if keep_T is not None:
            logits, probs, idx = logits[keep_T], probs[keep_T], idx[keep_T]
        lb.append(_hand_load_balance(probs.tolist(), idx.tolist()))
        z.append(sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / logits.shape[0])
        rows = weight.detach().tolist()
        n = len(rows)
        norms = [math.sqrt(sum(v * v for v in r)) for r in rows]
        acc = 0.0
        for i in range(n):
            for j in range(n):
                cos = sum(a * c for a, c in zip(rows[i], rows[j])) / (norms[i] * norms[j])
                acc += (cos - (i == j)) ** 2
        orth.append(acc / n**2)
    return {"load_balance": sum(lb) / len(lb), "z": sum(z) / len(z), "orthogonal": sum(orth) / len(orth)}


def _labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[0, 2] = -100
    labels[1, -1] = -100
    labels[1, 1] = -100
    return labels


def _hand_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    lg, lb = logits[:, :-1].detach(), labels[:, 1:]
    terms = []
    for bi in range(lb.shape[0]):
        for ti in range(lb.shape[1]):
            y = int(lb[bi, ti])
            if y == -100:
                continue
            row = lg[bi, ti].tolist()
            m = max(row)
            terms.append(m + math.log(sum(math.exp(v - m) for v in row)) - row[y])
    return sum(terms) / len(terms)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_model_router_loss_and_total_loss(padded: bool) -> None:
    cfg = MoEConfig(aux_loss_coef=0.01, z_loss_coef=0.002, orthogonal_loss_coef=0.3)
    model = _model(cfg, seed=1)
    model.train()
    records = _capture_gates(model)
    b, t = 2, 7
    ids = torch.randint(1, 64, (b, t), generator=torch.Generator().manual_seed(2))
    labels = _labels(ids)
    mask = None
    if padded:
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, 5:] = 0
        labels[0, 5:] = -100
    out = model(ids, attention_mask=mask, labels=labels)

    assert set(out.router_losses) == {"load_balance", "z", "orthogonal"}
    keep = None if mask is None else mask.reshape(-1).bool()
    ref = _ref_router_losses(records, [blk.gate.weight for blk in model.moe_blocks()], keep)
    for name, value in ref.items():
        assert out.router_losses[name].item() == pytest.approx(value, rel=1e-4), name
    assert ref["load_balance"] > 1.0 and ref["z"] > 0 and ref["orthogonal"] > 0
    expected_router = 0.01 * ref["load_balance"] + 0.002 * ref["z"] + 0.3 * ref["orthogonal"]
    assert out.router_loss.item() == pytest.approx(expected_router, rel=1e-4)
    manual = (
        cfg.aux_loss_coef * out.router_losses["load_balance"]
        + cfg.z_loss_coef * out.router_losses["z"]
        + cfg.orthogonal_loss_coef * out.router_losses["orthogonal"]
    )
    torch.testing.assert_close(out.router_loss, manual)

    torch.testing.assert_close(out.loss, out.lm_loss + out.router_loss)
    shifted = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, shifted)
    assert out.lm_loss.item() == pytest.approx(_hand_lm_loss(out.logits, labels), rel=1e-5)

    # The router loss is differentiable w.r.t. every gate weight.
    out.router_loss.backward()
    for blk in model.moe_blocks():
        assert blk.gate.weight.grad is not None and blk.gate.weight.grad.abs().sum() > 0


def test_router_loss_absent_in_eval_and_no_grad() -> None:
    model = _model(MoEConfig(aux_loss_coef=0.01, z_loss_coef=0.002, orthogonal_loss_coef=0.3))
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    labels = _labels(ids)

    model.eval()
    out = model(ids, labels=labels)
    assert out.router_loss is None and out.router_losses == {}
    torch.testing.assert_close(out.loss, out.lm_loss)
    assert out.expert_load is not None and out.expert_load.sum(-1).tolist() == [2 * 6 * K] * 2

    model.train()
    with torch.no_grad():
        out_ng = model(ids, labels=labels)
    assert out_ng.router_loss is None and out_ng.router_losses == {}
    torch.testing.assert_close(out_ng.loss, out_ng.lm_loss)
    torch.testing.assert_close(out_ng.lm_loss, out.lm_loss)  # no dropout: same forward in both modes

    out_train = model(ids, labels=labels)
    assert out_train.router_loss is not None
    assert out_train.loss.item() > out_train.lm_loss.item()


def test_dense_model_has_no_router_outputs() -> None:
    torch.manual_seed(0)
    model = ErnieForCausalLM(_args(moe_num_experts=0), MoEConfig(aux_loss_coef=1.0))
    model.train()
    ids = torch.randint(1, 64, (2, 5))
    out = model(ids, labels=ids)
    assert out.expert_load is None and out.router_loss is None and out.router_losses == {}
    torch.testing.assert_close(out.loss, out.lm_loss)
