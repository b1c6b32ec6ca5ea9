"""Dropless MoE expert kernels (`kernels.moe_experts`): every backend against the eager autograd reference (outputs and
gradients), a dense per-token reference, bf16, two expert pools of different widths, the torch backend's saved
tensors, the routing plan and the error messages."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import ernie_platform.kernels.moe as kmoe
from ernie_platform.kernels import BACKENDS, moe_experts, plan_routing

ATOL = 1e-6
RTOL = 1e-5
GRAD_NAMES = ("x", "topk_w", "w13", "w2")

HAS_CUDA = torch.cuda.is_available()
HAS_MEGABLOCKS = importlib.util.find_spec("grouped_gemm") is not None
NO_CUDA = "no CUDA device on this machine"
NO_MEGABLOCKS = f"MegaBlocks (grouped_gemm) is not importable; install with: {kmoe.MEGABLOCKS_INSTALL}"


CPU_GEMM_MODES = getattr(kmoe, "CPU_GEMM_MODES", ("default",))


def _impls() -> list[str]:
    """Non-reference backends that run on CPU tensors here, the torch one once per CPU grouped-GEMM mode
    ("torch-threads", "torch-grouped_mm", "torch-loop"). megablocks is CUDA-only and has its own tests below."""
    out = []
    for b in BACKENDS:
        if b == "torch":
            out += [f"torch-{m}" for m in CPU_GEMM_MODES]
        elif b not in ("eager", "megablocks"):
            out.append(b)
    return out


@pytest.fixture(params=_impls())
def backend(request, monkeypatch) -> str:
    """A backend under test; for torch, with `ernie_platform.kernels.moe.cpu_gemm_mode` set to the mode in the id."""
    name, _, mode = request.param.partition("-")
    if mode and mode != "default":
        monkeypatch.setattr(kmoe, "cpu_gemm_mode", mode)
    threads = torch.get_num_threads()
    yield name
    assert torch.get_num_threads() == threads, "a grouped GEMM left the intra-op thread count changed"


# ---- inputs and references -------------------------------------------------------------------------------------


def _dense_reference(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF) -> torch.Tensor:
    """Token-by-token, k-by-k: Σ_k w · (silu(x Wgate[e]ᵀ) ⊙ x Wup[e]ᵀ) Wdown[e]ᵀ, differentiable."""
    f = w2_EDF.shape[-1]
    rows = []
    for t in range(x_TD.shape[0]):
        acc = x_TD.new_zeros(x_TD.shape[1])
        for k in range(idx_TK.shape[1]):
            e = int(idx_TK[t, k])
            gate, up = w13_E2FD[e, :f] @ x_TD[t], w13_E2FD[e, f:] @ x_TD[t]
            acc = acc + w_TK[t, k].to(x_TD.dtype) * (w2_EDF[e] @ (F.silu(gate) * up))
        rows.append(acc)
    return torch.stack(rows) if rows else x_TD.new_zeros(0, x_TD.shape[1])


def _distinct_topk(t: int, e: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Per token, k distinct experts (as a real router picks them)."""
    if t == 0:
        return torch.zeros(0, k, dtype=torch.long)
    return torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])


def _inputs(t: int, d: int, e: int, f: int, k: int, seed: int = 0, idx_TK: torch.Tensor | None = None):
    """x [T, D], idx [T, K], renormalised weights [T, K], w13 [E, 2F, D] = cat(gate, up), w2 [E, D, F]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=gen)
    idx = _distinct_topk(t, e, k, gen) if idx_TK is None else idx_TK
    w = torch.rand(t, k, generator=gen) + 0.1
    w = w / w.sum(-1, keepdim=True)
    gate = torch.randn(e, f, d, generator=gen) / d**0.5
    up = torch.randn(e, f, d, generator=gen) / d**0.5
    w2 = torch.randn(e, d, f, generator=gen) / f**0.5
    return x, idx, w, torch.cat((gate, up), dim=1), w2


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _run(backend: str, x, idx, w, w13, w2, seed: int = 1):
    """Output and gradients of a non-trivial loss (random cotangent) w.r.t. x, the routing weights, w13 and w2."""
    lx, lw, l13, l2 = leaves = _leaves(x, w, w13, w2)
    y = moe_experts(lx, idx, lw, l13, l2, backend=backend)
    cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)  # y's device and dtype
    (y * cot).sum().backward()
    return y.detach(), [t.grad for t in leaves]


def _assert_grads_close(got, want, rtol: float = RTOL, atol: float = ATOL) -> None:
    for name, a, b in zip(GRAD_NAMES, got, want):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"grad {n}: {m}")


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| relative to the scale of ref (max |ref|)."""
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


# ---- 1. backends vs eager (and a dense reference) on random routings, fp32 ---------------------------------------

# (T, D, E, F, K). D, F and T·K multiples of 4 take CPU grouped_mm; the others take the per-expert loop.
SHAPES = [
    (1, 8, 2, 4, 1),
    (7, 8, 4, 12, 1),  # K = 1, loop (N = 7)
    (8, 16, 4, 8, 2),  # grouped_mm
    (6, 8, 3, 8, 3),  # K = E
    (13, 12, 6, 16, 4),
    (3, 16, 16, 8, 2),  # E = 16 with only 6 routed pairs: most experts get no tokens
    (12, 16, 16, 8, 1),  # E = 16, K = 1
    (10, 16, 16, 8, 2),  # E = 16, K = 2
    (8, 16, 16, 16, 6),  # E = 16, K = 6
    (6, 32, 16, 16, 8),  # E = 16, K = 8
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-D{}-E{}-F{}-K{}".format(*s))
def test_backend_matches_eager_and_dense_reference(backend: str, shape) -> None:
    t, d, e, f, k = shape
    inputs = _inputs(t, d, e, f, k)
    y, grads = _run(backend, *inputs)
    y_eager, grads_eager = _run("eager", *inputs)
    assert y.shape == (t, d) and y.dtype == torch.float32
    torch.testing.assert_close(y, y_eager, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(y_eager, _dense_reference(*inputs), rtol=RTOL, atol=ATOL)
    _assert_grads_close(grads, grads_eager)
    for name, g in zip(GRAD_NAMES, grads):
        assert g.abs().sum() > 0, name
    # Experts that got no token get exactly zero weight gradient.
    unused = torch.ones(e, dtype=torch.bool)
    unused[inputs[1].unique()] = False
    assert torch.all(grads[2][unused] == 0) and torch.all(grads[3][unused] == 0)


def test_gradients_match_dense_reference_autograd(backend: str) -> None:
    inputs = _inputs(5, 8, 3, 8, 2, seed=3)
    x, idx, w, w13, w2 = inputs
    lx, lw, l13, l2 = leaves = _leaves(x, w, w13, w2)
    cot = torch.randn(5, 8, generator=torch.Generator().manual_seed(9))
    (_dense_reference(lx, idx, lw, l13, l2) * cot).sum().backward()
    for be in ("eager", backend):
        _, grads = _run(be, *inputs, seed=9)
        _assert_grads_close(grads, [t.grad for t in leaves])


@pytest.mark.parametrize("t", [6, 8], ids=["loop", "grouped_mm"])
def test_experts_with_zero_tokens(backend: str, t: int) -> None:
    # E = 5 but only experts 1 and 3 are ever chosen: experts 0, 2, 4 (incl. the first and the last) get no tokens.
    idx = torch.tensor([[1, 3], [3, 1]]).repeat(t // 2, 1)
    inputs = _inputs(t, 8, 5, 8, 2, idx_TK=idx)
    y, grads = _run(backend, *inputs)
    y_eager, grads_eager = _run("eager", *inputs)
    torch.testing.assert_close(y, y_eager, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(y, _dense_reference(*inputs), rtol=RTOL, atol=ATOL)
    _assert_grads_close(grads, grads_eager)
    for g in grads[2:]:
        assert torch.all(g[[0, 2, 4]] == 0)
        assert g[1].abs().sum() > 0 and g[3].abs().sum() > 0


@pytest.mark.parametrize("k", [1, 2])
def test_one_expert_receives_every_token(backend: str, k: int) -> None:
    t, e = 8, 16
    idx = torch.full((t, 1), 5)
    if k == 2:  # expert 5 in every token's top-k, the second choice random (and never 5)
        idx = torch.cat((idx, torch.tensor([0, 1, 2, 3, 4, 6, 7, 15]).unsqueeze(-1)), dim=1)
    inputs = _inputs(t, 16, e, 8, k, idx_TK=idx)
    y, grads = _run(backend, *inputs)
    y_eager, grads_eager = _run("eager", *inputs)
    torch.testing.assert_close(y, y_eager, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(y, _dense_reference(*inputs), rtol=RTOL, atol=ATOL)
    _assert_grads_close(grads, grads_eager)


def test_repeated_expert_within_a_token(backend: str) -> None:
    # Not what a router produces, but the contract is a plain sum over k: a repeated expert counts twice.
    idx = torch.randint(0, 3, (8, 2), generator=torch.Generator().manual_seed(4))
    idx[0] = torch.tensor([1, 1])
    inputs = _inputs(8, 8, 3, 8, 2, idx_TK=idx)
    y, grads = _run(backend, *inputs)
    y_eager, grads_eager = _run("eager", *inputs)
    torch.testing.assert_close(y, _dense_reference(*inputs), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(y, y_eager, rtol=RTOL, atol=ATOL)
    _assert_grads_close(grads, grads_eager)


@pytest.mark.parametrize("ref", [False, True], ids=["", "eager"])
def test_zero_tokens(backend: str, ref: bool) -> None:
    x, idx, w, w13, w2 = _inputs(0, 8, 3, 8, 2)
    lx, lw, l13, l2 = leaves = _leaves(x, w, w13, w2)
    y = moe_experts(lx, idx, lw, l13, l2, backend="eager" if ref else backend)
    assert y.shape == (0, 8) and y.requires_grad
    y.sum().backward()
    for name, leaf in zip(GRAD_NAMES, leaves):
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape and torch.all(leaf.grad == 0), name


def test_backward_through_sum_loss(backend: str) -> None:
    # y.sum() gives an expanded (stride-0) gradient, which CPU grouped_mm's backward rejects unless made contiguous.
    x, idx, w, w13, w2 = _inputs(10, 16, 4, 8, 2, seed=7)
    ref = _leaves(x, w, w13, w2)
    _dense_reference(ref[0], idx, ref[1], ref[2], ref[3]).sum().backward()
    for be in (backend, "eager"):
        leaves = _leaves(x, w, w13, w2)
        moe_experts(leaves[0], idx, leaves[1], leaves[2], leaves[3], backend=be).sum().backward()
        _assert_grads_close([t.grad for t in leaves], [t.grad for t in ref])


def test_float64(backend: str) -> None:
    # On CPU grouped_mm is only used for fp32; fp64 takes the per-expert GEMMs over contiguous segments.
    inputs = tuple(t.double() if t.is_floating_point() else t for t in _inputs(12, 8, 4, 8, 2, seed=5))
    y, grads = _run(backend, *inputs)
    y_eager, grads_eager = _run("eager", *inputs)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _dense_reference(*inputs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_eager, rtol=1e-12, atol=1e-12)
    _assert_grads_close(grads, grads_eager, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 6, 3, 8, 2), (4, 8, 3, 5, 2)], ids=["D6", "F5"])
def test_unaligned_widths(backend: str, shape) -> None:
    # Widths grouped_mm can't take (rows not 16-byte aligned) fall back to per-expert GEMMs.
    inputs = _inputs(*shape)
    y, grads = _run(backend, *inputs)
    y_eager, grads_eager = _run("eager", *inputs)
    torch.testing.assert_close(y, _dense_reference(*inputs), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(y, y_eager, rtol=RTOL, atol=ATOL)
    _assert_grads_close(grads, grads_eager)


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="this torch has no F.grouped_mm")
@pytest.mark.parametrize("mode", CPU_GEMM_MODES)
@pytest.mark.parametrize("case", ["aligned_fp32", "unaligned_D6", "fp64", "bf16"])
def test_torch_backend_grouped_mm_dispatch(monkeypatch, mode: str, case: str) -> None:
    """F.grouped_mm runs (2 forward + 4 backward GEMMs) only in mode grouped_mm with aligned CPU fp32 operands."""
    calls = []
    real = F.grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(kmoe.F, "grouped_mm", counting)
    if mode != "default":
        monkeypatch.setattr(kmoe, "cpu_gemm_mode", mode)
    x, idx, w, w13, w2 = _inputs(8, 6 if case == "unaligned_D6" else 8, 4, 8, 2)
    dtype = {"fp64": torch.float64, "bf16": torch.bfloat16}.get(case, torch.float32)
    x, w, w13, w2 = (t.to(dtype) for t in (x, w, w13, w2))
    threads = torch.get_num_threads()
    _, grads = _run("torch", x, idx, w, w13, w2)
    assert torch.get_num_threads() == threads
    assert len(calls) == (6 if case == "aligned_fp32" and mode == "grouped_mm" else 0)
    assert all(g is not None and g.dtype == dtype for g in grads)


# ---- 2. bf16 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 32, 8, 16, 2), (12, 16, 16, 8, 6)], ids=["E8-K2", "E16-K6"])
def test_bf16_matches_eager_bf16_and_fp32(backend: str, shape) -> None:
    inputs32 = _inputs(*shape, seed=2)
    inputs16 = tuple(t.bfloat16() if t.is_floating_point() else t for t in inputs32)
    y, grads = _run(backend, *inputs16)
    y_eager, grads_eager = _run("eager", *inputs16)
    y32, grads32 = _run("eager", *inputs32)
    assert y.dtype == torch.bfloat16
    for g, leaf in zip(grads, inputs16[:1] + inputs16[2:]):
        assert g.dtype == leaf.dtype
    assert _rel_err(y, y_eager) < 1e-2
    assert _rel_err(y, y32) < 1e-2
    for name, a, b, c in zip(GRAD_NAMES, grads, grads_eager, grads32):
        assert _rel_err(a, b) < 1e-2, name
        assert _rel_err(a, c) < 2e-2, name


# ---- 3. two expert pools of different widths (VL text / vision experts) -----------------------------------------


def test_two_expert_pools_of_different_widths(backend: str) -> None:
    t, d, k = 12, 16, 2
    pools = {"text": (8, 32), "vision": (4, 16)}  # name: (E, F)
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(t, d, generator=gen)
    is_vision_T = torch.tensor([0, 0, 1, 1, 1, 0, 1, 0, 0, 1, 1, 0], dtype=torch.bool)
    rows = {"text": (~is_vision_T).nonzero().squeeze(-1), "vision": is_vision_T.nonzero().squeeze(-1)}
    routing, weights = {}, {}
    for i, (name, (e, f)) in enumerate(pools.items()):
        _, idx, w, w13, w2 = _inputs(len(rows[name]), d, e, f, k, seed=30 + i)
        routing[name], weights[name] = (idx, w), (w13, w2)

    def combined(be: str):
        lx = _leaves(x)[0]
        leaves = {name: _leaves(routing[name][1], *weights[name]) for name in pools}
        y = torch.zeros_like(lx)
        for name in pools:
            lw, l13, l2 = leaves[name]
            y_pool = moe_experts(lx[rows[name]], routing[name][0], lw, l13, l2, backend=be)
            y = y.index_copy(0, rows[name], y_pool)
        cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
        (y * cot).sum().backward()
        return y.detach(), [lx.grad] + [leaf.grad for name in pools for leaf in leaves[name]]

    ref = torch.zeros(t, d)
    for name in pools:
        idx, w = routing[name]
        ref[rows[name]] = _dense_reference(x[rows[name]], idx, w, *weights[name])

    y, grads = combined(backend)
    y_eager, grads_eager = combined("eager")
    torch.testing.assert_close(y, ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(y, y_eager, rtol=RTOL, atol=ATOL)
    assert [g.shape for g in grads] == [g.shape for g in grads_eager]
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
        assert a.abs().sum() > 0


# ---- 4. the torch backend keeps only the pre-activation ---------------------------------------------------------


def _saved_shapes(backend: str, x, idx, w, w13, w2) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    lx, lw, l13, l2 = _leaves(x, w, w13, w2)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = moe_experts(lx, idx, lw, l13, l2, backend=backend)
    return y, shapes


def test_torch_backend_saves_no_activation_or_expert_output() -> None:
    # Distinct sizes so each shape names one tensor: T=5, K=2 → N=10, D=12, E=3, F=8 (2F=16).
    t, d, e, f, k = 5, 12, 3, 8, 2
    n = t * k
    inputs = _inputs(t, d, e, f, k, seed=13)
    y, shapes = _saved_shapes("torch", *inputs)
    # Everything the forward saves for backward: plan_routing's gather index, then _GroupedSwiGLU's x, combine
    # weights, w13, w2, token index, per-expert counts and the [N, 2F] pre-activation.
    assert set(shapes) == {(t, d), (n,), (e, 2 * f, d), (e, d, f), (e,), (n, 2 * f)}
    assert (n, f) not in shapes, "the [N, F] SwiGLU activation must be recomputed, not saved"
    assert (n, d) not in shapes, "the [N, D] expert outputs must not be saved"
    assert shapes.count((n, 2 * f)) == 1
    # The autograd node itself: x, weight_N, w13, w2, token_N, counts_E, h_N2F (the N-sized index of the gather is
    # plan_routing's, not the node's).
    saved_by_node = sorted(tuple(s.shape) for s in y.grad_fn.saved_tensors)
    assert saved_by_node == sorted([(t, d), (n,), (e, 2 * f, d), (e, d, f), (n,), (e,), (n, 2 * f)])
    # The eager reference, by contrast, does keep per-expert [n_e, F] activations (so the check above can fail).
    _, eager_shapes = _saved_shapes("eager", *inputs)
    assert any(len(s) == 2 and s[1] == f and s[0] not in (d, 2 * f) for s in eager_shapes)


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
    x, idx, w, w13, w2 = _inputs(3, 8, 2, 4, 1)
    with pytest.raises(ValueError, match="nope"):
        moe_experts(x, idx, w, w13, w2, backend="nope")
    assert set(BACKENDS) == {"torch", "eager", "megablocks"}


@pytest.mark.parametrize(
    "bad",
    [
        dict(x=torch.zeros(3, 4, 8)),  # x not 2-D
        dict(w=torch.ones(3, 2)),  # topk weights shape != topk idx shape
        dict(idx=torch.zeros(4, 1, dtype=torch.long), w=torch.ones(4, 1)),  # T mismatch with x
        dict(w13=torch.zeros(2, 8, 6)),  # D of w13 != D of x
        dict(w13=torch.zeros(2, 7, 8)),  # odd 2F
        dict(w2=torch.zeros(2, 8, 3)),  # F of w2 != half of w13's 2F
        dict(w2=torch.zeros(3, 8, 4)),  # E mismatch
        dict(w13=torch.zeros(8, 8)),  # w13 not 3-D
    ],
    ids=["x3d", "w_vs_idx", "T_mismatch", "w13_D", "w13_odd", "w2_F", "w2_E", "w13_2d"],
)
def test_shape_mismatch_raises_value_error_naming_shapes(bad) -> None:
    x, idx, w, w13, w2 = _inputs(3, 8, 2, 4, 1)
    x, idx, w = bad.get("x", x), bad.get("idx", idx), bad.get("w", w)
    w13, w2 = bad.get("w13", w13), bad.get("w2", w2)
    with pytest.raises(ValueError) as exc:
        moe_experts(x, idx, w, w13, w2)
    msg = str(exc.value)
    for shape in (x.shape, idx.shape, w.shape, w13.shape, w2.shape):
        assert str(tuple(shape)) in msg


# ---- 6. megablocks ---------------------------------------------------------------------------------------------


def test_megablocks_on_cpu_raises_runtime_error_naming_cuda() -> None:
    x, idx, w, w13, w2 = _inputs(3, 8, 2, 4, 1)
    with pytest.raises(RuntimeError) as exc:
        moe_experts(x, idx, w, w13, w2, backend="megablocks")
    msg = str(exc.value)
    assert "CUDA" in msg
    assert "megablocks" in msg.lower()
    assert "moe.backend=torch" in msg  # tells the user what to use instead


def test_megablocks_install_command_is_documented() -> None:
    assert "MegaBlocks" in kmoe.MEGABLOCKS_INSTALL and "grouped_gemm" in kmoe.MEGABLOCKS_INSTALL
    assert "--no-deps" in kmoe.MEGABLOCKS_INSTALL  # its PyPI pins would otherwise replace the installed torch
    assert "--no-build-isolation" in kmoe.MEGABLOCKS_INSTALL  # build against the installed torch, not a fresh one


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
@pytest.mark.skipif(HAS_MEGABLOCKS, reason="MegaBlocks is installed, so the not-installed error cannot be triggered")
def test_megablocks_not_installed_names_install_command() -> None:
    x, idx, w, w13, w2 = (t.cuda() for t in _inputs(8, 16, 4, 8, 2))
    with pytest.raises(RuntimeError) as exc:
        moe_experts(x.bfloat16(), idx, w.bfloat16(), w13.bfloat16(), w2.bfloat16(), backend="megablocks")
    assert kmoe.MEGABLOCKS_INSTALL in str(exc.value)


@pytest.mark.skipif(not (HAS_CUDA and HAS_MEGABLOCKS), reason=NO_CUDA if not HAS_CUDA else NO_MEGABLOCKS)
@pytest.mark.parametrize("shape", [(64, 128, 8, 64, 2), (32, 128, 16, 64, 8), (0, 128, 8, 64, 2)], ids=str)
def test_megablocks_matches_eager_on_cuda(shape) -> None:
    inputs32 = tuple(t.cuda() for t in _inputs(*shape, seed=3))
    inputs16 = tuple(t.bfloat16() if t.is_floating_point() else t for t in inputs32)
    y, grads = _run("megablocks", *inputs16)
    y32, grads32 = _run("eager", *inputs32)
    assert y.shape == y32.shape and y.dtype == torch.bfloat16
    if shape[0]:
        assert _rel_err(y, y32) < 1e-2
        for name, a, b in zip(GRAD_NAMES, grads, grads32):
            assert a is not None and _rel_err(a, b) < 2e-2, name


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_torch_backend_on_cuda_bf16() -> None:
    inputs32 = tuple(t.cuda() for t in _inputs(64, 128, 8, 64, 2, seed=3))
    inputs16 = tuple(t.bfloat16() if t.is_floating_point() else t for t in inputs32)
    y, grads = _run("torch", *inputs16)
    y32, grads32 = _run("eager", *inputs32)
    assert _rel_err(y, y32) < 1e-2
    for name, a, b in zip(GRAD_NAMES, grads, grads32):
        assert _rel_err(a, b) < 2e-2, name


@pytest.mark.parametrize("bad", [2, -1])
@pytest.mark.parametrize("be", ["torch", "eager"])
def test_out_of_range_expert_ids_are_rejected(be: str, bad: int) -> None:
    x, w13, w2 = torch.randn(3, 8), torch.randn(2, 8, 8), torch.randn(2, 8, 4)
    idx = torch.tensor([[0, 1], [1, bad], [0, 1]])
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 2\)"):
        moe_experts(x, idx, torch.full((3, 2), 0.5), w13, w2, backend=be)
