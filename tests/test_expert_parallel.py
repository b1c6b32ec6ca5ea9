"""Expert parallelism (kernels/expert_parallel.py): placement math, replicas and re-placement in one process (a
1-rank gloo group), and EP=2 training on a real 2-worker Ray Train (gloo) run giving the same loss and gradients as
EP=1 data parallelism on the same global batch — for permutations, replicated experts, and experts moved (with their
AdamW state) between optimizer steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
import torch

from ernie_platform.kernels.expert_parallel import (
    ExpertParallel,
    allreduce_gradients,
    apply_placement,
    expert_grad_sq_sum,
    experts_per_rank,
    gather_experts,
    identity_placement,
    local_experts,
    new_expert_parallel_groups,
    placement_tables,
    replica_tables,
    shard_experts,
    slot_location,
    validate_phy2log,
    validate_placement,
)
from ernie_platform.models import ErnieForCausalLM
from ernie_platform.models.config import ErnieModelArgs, MoEConfig

MODEL_KW = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    moe_num_experts=8,
    moe_k=2,
    moe_intermediate_size=16,
    moe_num_shared_experts=1,
)
EP = 2
INIT_SEED = 1234


def _build_model(skew: bool) -> ErnieForCausalLM:
    torch.manual_seed(INIT_SEED)
    # Non-zero z / orthogonal coefficients so every router-loss path contributes to the router's gradient.
    model = ErnieForCausalLM(ErnieModelArgs(**MODEL_KW), MoEConfig(z_loss_coef=1e-3, orthogonal_loss_coef=1e-2))
    if skew:
        # Selection bias steers every token's top-2 into experts 0..3: with the identity placement EP rank 1 receives
        # no rows at all (the empty-chunk path of the all-to-all) while the routing weights stay the unbiased probs.
        for block in model.moe_blocks():
            block.gate.e_score_correction_bias[:, :4] = 10.0
    return model


def _global_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, MODEL_KW["vocab_size"], (4, 16), generator=g)  # 4 sequences × 16 tokens


# 8 experts in 12 slots, 6 per rank: expert 0 three times (both ranks), 3 twice on rank 1, 5 twice across ranks.
REPLICATED = [0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 3, 5]
MOVED = [[7, 0, 6, 1, 5, 0, 2, 4, 3, 7, 0, 1]]  # one row per MoE layer (the test model has one)


def _scenarios() -> list[tuple[str, list[int] | None, list[int] | None, bool]]:
    shuffled = torch.randperm(MODEL_KW["moe_num_experts"], generator=torch.Generator().manual_seed(3)).tolist()
    assert shuffled != sorted(shuffled)
    return [
        ("identity", None, None, False),
        ("shuffled", shuffled, None, False),
        ("skewed", None, None, True),
        ("replicated", None, REPLICATED, False),
    ]


def _train_two_steps(model: ErnieForCausalLM, ids: list[torch.Tensor], between=None) -> list[float]:
    """Two AdamW steps on `ids[0]` then `ids[1]`; `between(model, opt)` runs after the first step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for i, batch in enumerate(ids):
        loss = model(batch, labels=batch).loss
        loss.backward()
        if model.moe_blocks()[0].expert_parallel is not None:
            allreduce_gradients(model, None, None)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if i == 0 and between is not None:
            between(model, opt)
    return losses


def _train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: EP=2 forward/backward on its half of the global batch for every scenario."""
    import torch.distributed as dist

    rank = dist.get_rank()
    ep_group, expert_dp_group = new_expert_parallel_groups(EP)  # world 2, EP 2: no expert-DP group
    local_ids = _global_batch().chunk(dist.get_world_size())[rank]
    results = {}
    for name, placement, phy2log, skew in config["scenarios"]:
        model = _build_model(skew)
        shard_experts(
            model,
            ep_group,
            None if placement is None else torch.tensor(placement),
            None if phy2log is None else torch.tensor(phy2log),
        )
        block = model.moe_blocks()[0]
        out = model(local_ids, labels=local_ids)
        out.loss.backward()
        allreduce_gradients(model, None, expert_dp_group)
        local_shape = tuple(block.w13_E2FD.shape)
        gather_experts(model, grads=True)
        results[name] = {
            "loss": out.loss.detach().clone(),
            "local_w13_shape": list(local_shape),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
        }
    # Replicated slots, moved (weights and AdamW moments) to other ranks between two optimizer steps.
    model = _build_model(False)
    shard_experts(model, ep_group, phy2log=torch.tensor(REPLICATED))
    halves = [b.chunk(dist.get_world_size())[rank] for b in _two_batches()]
    moved = []
    losses = _train_two_steps(model, halves, lambda m, opt: moved.append(apply_placement(m, torch.tensor(MOVED), opt)))
    assert [t.tolist() for t in placement_tables(model)] == MOVED
    gather_experts(model)
    results["moved"] = {
        "losses": losses,
        "slots_moved": moved[0],
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
    }
    torch.save(results, Path(config["out_dir"]) / f"rank{rank}.pt")


def _two_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, MODEL_KW["vocab_size"], (4, 16), generator=g) for _ in range(2)]


def _reference(skew: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """EP=1 data parallelism in one process: mean of the two ranks' losses, one backward."""
    model = _build_model(skew)
    outs = [model(ids, labels=ids) for ids in _global_batch().chunk(EP)]
    loss = sum(o.loss for o in outs) / EP
    loss.backward()
    load = sum(o.expert_load for o in outs)
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, load


# ---- placement math ------------------------------------------------------------------------------------------------


def test_slot_to_rank_and_local_index() -> None:
    assert experts_per_rank(8, 2) == 4
    assert [slot_location(s, 8, 2) for s in range(8)] == [(r, i) for r in range(2) for i in range(4)]
    ranks, local = slot_location(torch.arange(8), 8, 4)
    assert ranks.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and local.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert identity_placement(4).tolist() == [0, 1, 2, 3]
    placement = torch.tensor([5, 0, 7, 2, 1, 6, 3, 4])  # expert e sits in slot placement[e]
    shards = [local_experts(placement, 2, r).tolist() for r in range(2)]
    assert shards == [[1, 4, 3, 6], [7, 0, 5, 2]]  # slots 0..3 on rank 0, 4..7 on rank 1, in slot order
    for r, shard in enumerate(shards):
        for local_idx, e in enumerate(shard):
            assert slot_location(int(placement[e]), 8, 2) == (r, local_idx)


def test_placement_errors() -> None:
    with pytest.raises(ValueError, match="moe_num_experts=6 is not divisible by expert_parallel_size=4"):
        experts_per_rank(6, 4)
    with pytest.raises(ValueError, match="not divisible"):
        validate_placement(torch.arange(6), 6, 4)
    with pytest.raises(ValueError, match="permutation"):
        validate_placement(torch.tensor([0, 1, 1, 3]), 4, 2)
    with pytest.raises(ValueError, match="permutation"):
        validate_placement(torch.arange(3), 4, 2)


# ---- EP=2 on Ray Train vs EP=1 -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_ep2_on_ray_train_matches_ep1_data_parallel(ray_local, tmp_path: Path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Ship this module's functions by value: the workers cannot import a pytest test module by name.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    scenarios = _scenarios()
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"out_dir": str(out_dir), "scenarios": scenarios},
        scaling_config=ScalingConfig(num_workers=EP, use_gpu=False, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="ep2"),
    )
    trainer.fit()
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(EP)]

    e = MODEL_KW["moe_num_experts"]
    for name, _, phy2log, skew in scenarios:
        ref_loss, ref_grads, ref_load = _reference(skew)
        if skew:  # the scenario really left EP rank 1 without tokens
            assert ref_load[:, e // 2 :].sum() == 0
        per_rank = [r[name] for r in ranks]
        assert per_rank[0]["local_w13_shape"][0] == (e if phy2log is None else len(phy2log)) // EP
        mean_loss = sum(r["loss"] for r in per_rank) / EP
        assert torch.allclose(mean_loss, ref_loss, rtol=0, atol=1e-5), (name, mean_loss, ref_loss)
        for r, res in enumerate(per_rank):
            assert res["grads"].keys() == ref_grads.keys()
            for pname, ref in ref_grads.items():
                got = res["grads"][pname]
                assert got.shape == ref.shape, (name, r, pname)
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6, msg=f"{name} rank{r} {pname}")

    # Moved between the steps: the loss of each step is the mean of the ranks' losses, the final weights (all
    # replicas updated alike) those of one process training on the whole batches.
    ref = _build_model(False)
    ref_losses = []
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for batch in _two_batches():
        loss = sum(ref(h, labels=h).loss for h in batch.chunk(EP)) / EP
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_losses.append(float(loss))
    moved = [r["moved"] for r in ranks]
    assert moved[0]["slots_moved"] == sum(a != b for row in MOVED for a, b in zip(REPLICATED, row))
    for step in range(2):
        assert sum(m["losses"][step] for m in moved) / EP == pytest.approx(ref_losses[step], abs=1e-5)
    for name, value in ref.named_parameters():
        for r in range(EP):
            torch.testing.assert_close(moved[r]["weights"][name], value.detach(), rtol=1e-4, atol=1e-5, msg=name)


# ---- replicas and re-placement in one process (a 1-rank gloo group) ------------------------------------------------


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_replica_tables_and_validation() -> None:
    log2phy, logcnt = replica_tables(torch.tensor(REPLICATED), 8)
    assert logcnt.tolist() == [3, 1, 1, 2, 1, 2, 1, 1]
    assert log2phy.shape == (8, 3)
    assert (
        log2phy[0].tolist() == [0, 8, 9] and log2phy[3].tolist() == [3, 10, -1] and log2phy[1].tolist() == [1, -1, -1]
    )
    with pytest.raises(ValueError, match=r"experts \[7\] have no slot"):
        validate_phy2log(torch.tensor([0, 1, 2, 3, 4, 5, 6, 6]), 8, 2)
    with pytest.raises(ValueError, match="9 expert slots .* not divisible by expert_parallel_size=2"):
        validate_phy2log(torch.arange(9) % 8, 8, 2)
    with pytest.raises(ValueError, match="outside"):
        validate_phy2log(torch.tensor([0, 1, 2, 8]), 4, 1)


def test_pairs_of_a_replicated_expert_split_evenly(one_rank_group) -> None:
    ep = ExpertParallel(4, None, phy2log_S=torch.tensor([0, 1, 2, 3, 0, 0, 2, 1]))
    topk = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1], [0, 2], [0, 3], [2, 0]])  # expert 0: 7 pairs over 3 slots
    slots = ep._slots(topk)
    assert torch.equal(ep.phy2log_S[slots], topk)  # every pair lands on a replica of its own expert
    per_slot = torch.bincount(slots.flatten(), minlength=8)
    assert sorted(per_slot[[0, 4, 5]].tolist()) == [2, 2, 3]  # expert 0: 7 pairs as evenly as 3 replicas allow
    assert per_slot[[1, 7]].tolist() == [1, 1] and per_slot[[2, 6]].tolist() == [2, 1]


def test_replicas_give_the_unsharded_loss_and_gradients(one_rank_group) -> None:
    ids = _global_batch()
    ref = _build_model(False)
    ref_loss = ref(ids, labels=ids).loss
    ref_loss.backward()
    model = _build_model(False)
    shard_experts(model, None, phy2log=torch.tensor(REPLICATED))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert float(loss) == pytest.approx(float(ref_loss), abs=1e-6)
    block = model.moe_blocks()[0]
    assert not torch.allclose(block.w13_E2FD.grad[0], block.w13_E2FD.grad[8])  # each replica saw part of expert 0
    allreduce_gradients(model, None, None)
    for slot, e in enumerate(REPLICATED):  # after the sync every replica holds its expert's whole gradient
        torch.testing.assert_close(
            block.w13_E2FD.grad[slot], ref.moe_blocks()[0].w13_E2FD.grad[e], atol=1e-7, rtol=1e-4
        )
    ref_sq = sum(
        float(b.w13_E2FD.grad.double().pow(2).sum() + b.w2_EDF.grad.double().pow(2).sum()) for b in ref.moe_blocks()
    )
    assert float(expert_grad_sq_sum(model)) == pytest.approx(ref_sq, rel=1e-5)  # replicas counted once


def test_apply_placement_moves_weights_and_adamw_state(one_rank_group) -> None:
    batches = _two_batches()
    ref_losses = _train_two_steps(_build_model(False), batches)
    model = _build_model(False)
    shard_experts(model, None, phy2log=torch.tensor(REPLICATED))
    moved = []
    losses = _train_two_steps(model, batches, lambda m, opt: moved.append(apply_placement(m, torch.tensor(MOVED), opt)))
    assert moved[0] > 0 and [t.tolist() for t in placement_tables(model)] == MOVED
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    with pytest.raises(ValueError, match="10 slots given, the layer has 12"):
        apply_placement(model, torch.arange(10) % 8)
