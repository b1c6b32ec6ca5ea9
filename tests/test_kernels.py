"""Dropless MoE expert kernels: backend parity (outputs and gradients), a dense reference, routing plan, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import BACKENDS, moe_experts, plan_routing

ATOL = 2e-6
RTOL = 1e-5


def _dense_reference(x_TD, idx_TK, w_TK, w1_EFD, w3_EFD, w2_EDF) -> torch.Tensor:
    """Token-by-token, k-by-k: Σ_k w · (silu(x W1[e]ᵀ) ⊙ x W3[e]ᵀ) W2[e]ᵀ."""
    rows = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros(x_TD.shape[1], dtype=x_TD.dtype)
        for k in range(idx_TK.shape[1]):
            e = int(idx_TK[t, k])
            x = x_TD[t]
            h = F.silu(w1_EFD[e] @ x) * (w3_EFD[e] @ x)
            acc = acc + w_TK[t, k] * (w2_EDF[e] @ h)
        rows.append(acc)
    if not rows:
        return x_TD.new_zeros(0, x_TD.shape[1])
    return torch.stack(rows)


def _distinct_topk(t: int, e: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Per token, k distinct experts (as a real router picks them)."""
    if t == 0:
        return torch.zeros(0, k, dtype=torch.long)
    return torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])


def _inputs(t: int, d: int, e: int, f: int, k: int, seed: int = 0, idx_TK: torch.Tensor | None = None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=gen)
    idx = _distinct_topk(t, e, k, gen) if idx_TK is None else idx_TK
    w = torch.rand(t, k, generator=gen) + 0.1
    w = w / w.sum(-1, keepdim=True)
    w1 = torch.randn(e, f, d, generator=gen) / d**0.5
    w3 = torch.randn(e, f, d, generator=gen) / d**0.5
    w2 = torch.randn(e, d, f, generator=gen) / f**0.5
    return x, idx, w, w1, w3, w2


def _run(backend: str, x, idx, w, w1, w3, w2, seed: int = 1):
    """Output and gradients of a non-trivial loss (random cotangent) w.r.t. x, w and the three expert weights."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, w1, w3, w2)]
    lx, lw, l1, l3, l2 = leaves
    y = moe_experts(lx, idx, lw, l1, l3, l2, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    cot = torch.randn(y.shape, generator=gen)
    (y * cot).sum().backward()
    return y.detach(), [t.grad for t in leaves]


# (T, D, E, F, K); D and F multiples of 4 take grouped_mm on CPU, other widths the per-expert loop (tested below).
SHAPES = [
    (1, 8, 2, 4, 1),
    (7, 8, 4, 12, 1),  # K = 1
    (9, 16, 4, 8, 2),
    (6, 8, 3, 8, 3),  # K = E
    (13, 12, 6, 16, 4),
    (32, 32, 8, 16, 2),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-D{}-E{}-F{}-K{}".format(*s))
def test_backends_agree_with_each_other_and_dense_reference(shape) -> None:
    t, d, e, f, k = shape
    x, idx, w, w1, w3, w2 = _inputs(t, d, e, f, k)
    y_torch, g_torch = _run("torch", x, idx, w, w1, w3, w2)
    y_eager, g_eager = _run("eager", x, idx, w, w1, w3, w2)
    ref = _dense_reference(x, idx, w, w1, w3, w2)
    assert y_torch.shape == (t, d)
    torch.testing.assert_close(y_torch, y_eager, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(y_torch, ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(y_eager, ref, rtol=RTOL, atol=ATOL)
    for name, a, b in zip(("x", "topk_w", "w1", "w3", "w2"), g_torch, g_eager):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"grad {n}: {m}")
        assert a.abs().sum() > 0, name


def test_gradients_match_dense_reference_autograd() -> None:
    x, idx, w, w1, w3, w2 = _inputs(5, 8, 3, 8, 2, seed=3)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, w1, w3, w2)]
    lx, lw, l1, l3, l2 = leaves
    cot = torch.randn(5, 8, generator=torch.Generator().manual_seed(9))
    (_dense_reference(lx, idx, lw, l1, l3, l2) * cot).sum().backward()
    _, grads = _run("torch", x, idx, w, w1, w3, w2, seed=9)
    for ref_leaf, g in zip(leaves, grads):
        torch.testing.assert_close(g, ref_leaf.grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_experts_with_zero_tokens(backend: str) -> None:
    # E = 5 but only experts 1 and 3 are ever chosen: experts 0, 2, 4 get no tokens (incl. the first and the last).
    t, d, e, f = 6, 8, 5, 8
    idx = torch.tensor([[1, 3], [3, 1], [1, 3], [3, 1], [1, 3], [3, 1]])
    x, idx, w, w1, w3, w2 = _inputs(t, d, e, f, 2, idx_TK=idx)
    y, grads = _run(backend, x, idx, w, w1, w3, w2)
    torch.testing.assert_close(y, _dense_reference(x, idx, w, w1, w3, w2), rtol=RTOL, atol=ATOL)
    _, g1, g3, g2 = grads[1:]
    for g in (g1, g3, g2):
        assert torch.all(g[[0, 2, 4]] == 0)
        assert g[1].abs().sum() > 0 and g[3].abs().sum() > 0
    y_other, grads_other = _run("eager" if backend == "torch" else "torch", x, idx, w, w1, w3, w2)
    torch.testing.assert_close(y, y_other, rtol=RTOL, atol=ATOL)
    for a, b in zip(grads, grads_other):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_all_tokens_to_one_expert() -> None:
    t, d, e, f = 4, 8, 4, 8
    idx = torch.full((t, 1), 2)
    x, idx, w, w1, w3, w2 = _inputs(t, d, e, f, 1, idx_TK=idx)
    ref = _dense_reference(x, idx, w, w1, w3, w2)
    for backend in ("torch", "eager"):
        torch.testing.assert_close(moe_experts(x, idx, w, w1, w3, w2, backend=backend), ref, rtol=RTOL, atol=ATOL)


def test_torch_backend_float64_loop_path() -> None:
    # On CPU grouped_mm is only used for fp32; fp64 takes the per-expert loop over contiguous segments.
    x, idx, w, w1, w3, w2 = (t.double() if t.is_floating_point() else t for t in _inputs(11, 8, 4, 8, 2, seed=5))
    y_torch = moe_experts(x, idx, w, w1, w3, w2, backend="torch")
    y_eager = moe_experts(x, idx, w, w1, w3, w2, backend="eager")
    ref = _dense_reference(x, idx, w, w1, w3, w2)
    assert y_torch.dtype == torch.float64
    torch.testing.assert_close(y_torch, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_eager, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 6, 3, 8, 2), (4, 8, 3, 5, 2)], ids=["D6", "F5"])
def test_torch_backend_unaligned_widths(shape) -> None:
    t, d, e, f, k = shape
    x, idx, w, w1, w3, w2 = _inputs(t, d, e, f, k)
    y = moe_experts(x, idx, w, w1, w3, w2, backend="torch")
    torch.testing.assert_close(y, _dense_reference(x, idx, w, w1, w3, w2), rtol=RTOL, atol=ATOL)


def test_torch_backend_zero_tokens() -> None:
    x, idx, w, w1, w3, w2 = _inputs(0, 8, 3, 8, 2)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, w1, w3, w2)]
    lx, lw, l1, l3, l2 = leaves
    y = moe_experts(lx, idx, lw, l1, l3, l2, backend="torch")
    assert y.shape == (0, 8)
    y.sum().backward()
    for g in (l1.grad, l3.grad, l2.grad):
        assert g is not None and torch.all(g == 0)


def test_eager_backend_zero_tokens_forward() -> None:
    x, idx, w, w1, w3, w2 = _inputs(0, 8, 3, 8, 2)
    y = moe_experts(x, idx, w, w1, w3, w2, backend="eager")
    assert y.shape == (0, 8)


def test_eager_backend_zero_tokens_backward() -> None:
    x, idx, w, w1, w3, w2 = _inputs(0, 8, 3, 8, 2)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, w1, w3, w2)]
    lx, lw, l1, l3, l2 = leaves
    y = moe_experts(lx, idx, lw, l1, l3, l2, backend="eager")
    y.sum().backward()
    assert l1.grad is not None and torch.all(l1.grad == 0)


@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_backward_through_sum_loss(backend: str) -> None:
    # y.sum() gives an expanded (stride-0) gradient, which CPU grouped_mm's backward rejects unless made contiguous.
    x, idx, w, w1, w3, w2 = _inputs(10, 16, 4, 8, 2, seed=7)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, w1, w3, w2)]
    lx, lw, l1, l3, l2 = leaves
    moe_experts(lx, idx, lw, l1, l3, l2, backend=backend).sum().backward()
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, w, w1, w3, w2)]
    rx, rw, r1, r3, r2 = ref_leaves
    _dense_reference(rx, idx, rw, r1, r3, r2).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=RTOL, atol=ATOL)


# ---- plan_routing ----------------------------------------------------------------------------------------------


def test_plan_routing_is_a_stable_grouping() -> None:
    idx = torch.tensor([[2, 0], [0, 2], [1, 2], [2, 0], [3, 1]])
    w = torch.arange(10, dtype=torch.float32).reshape(5, 2) / 10
    plan = plan_routing(idx, w, num_experts=5)
    # Hand-built: flattened pairs [2,0,0,2,1,2,2,0,3,1]; per expert, positions in increasing order.
    expected_order = [1, 2, 7, 4, 9, 0, 3, 5, 6, 8]
    assert plan.order_N.tolist() == expected_order
    assert plan.token_N.tolist() == [p // 2 for p in expected_order]
    torch.testing.assert_close(plan.weight_N, w.reshape(-1)[torch.tensor(expected_order)])
    assert plan.tokens_per_expert_E.tolist() == [3, 2, 4, 1, 0]


def test_plan_routing_random_matches_bincount_and_stable_sort() -> None:
    gen = torch.Generator().manual_seed(11)
    t, k, e = 50, 3, 7
    idx = torch.randint(0, e, (t, k), generator=gen)
    w = torch.rand(t, k, generator=gen)
    plan = plan_routing(idx, w, num_experts=e)
    flat = idx.reshape(-1).tolist()
    assert plan.tokens_per_expert_E.tolist() == torch.bincount(idx.reshape(-1), minlength=e).tolist()
    assert plan.tokens_per_expert_E.tolist() == [flat.count(i) for i in range(e)]
    # Python's sorted is stable: group by expert, ties in original position order.
    assert plan.order_N.tolist() == sorted(range(len(flat)), key=lambda p: flat[p])
    assert plan.token_N.tolist() == [p // k for p in plan.order_N.tolist()]
    assert sorted(plan.order_N.tolist()) == list(range(t * k))  # a permutation


# ---- errors ----------------------------------------------------------------------------------------------------


def test_unknown_backend_raises_value_error() -> None:
    x, idx, w, w1, w3, w2 = _inputs(3, 8, 2, 4, 1)
    with pytest.raises(ValueError, match="nope"):
        moe_experts(x, idx, w, w1, w3, w2, backend="nope")
    assert "megablocks" in BACKENDS


def test_megablocks_on_cpu_raises_actionable_runtime_error() -> None:
    x, idx, w, w1, w3, w2 = _inputs(3, 8, 2, 4, 1)
    with pytest.raises(RuntimeError) as exc:
        moe_experts(x, idx, w, w1, w3, w2, backend="megablocks")
    msg = str(exc.value)
    assert "megablocks" in msg.lower()
    assert "moe.backend=torch" in msg  # tells the user what to use instead


@pytest.mark.parametrize(
    "bad",
    [
        dict(x=torch.zeros(3, 4, 8)),  # x not 2-D
        dict(w=torch.ones(3, 2)),  # topk weights shape != topk idx shape
        dict(idx=torch.zeros(4, 1, dtype=torch.long), w=torch.ones(4, 1)),  # T mismatch with x
    ],
    ids=["x3d", "w_vs_idx", "T_mismatch"],
)
def test_shape_mismatch_raises_value_error_naming_shapes(bad) -> None:
    x, idx, w, w1, w3, w2 = _inputs(3, 8, 2, 4, 1)
    x, idx, w = bad.get("x", x), bad.get("idx", idx), bad.get("w", w)
    with pytest.raises(ValueError) as exc:
        moe_experts(x, idx, w, w1, w3, w2)
    msg = str(exc.value)
    for shape in (x.shape, idx.shape, w.shape):
        assert str(tuple(shape)) in msg
