"""Expert parallelism (kernels/expert_parallel.py): placement math, and EP=2 training on a real 2-worker Ray Train
(gloo) run giving the same loss and gradients as EP=1 data parallelism on the same global batch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
import torch

from ernie_platform.models import ErnieForCausalLM
from ernie_platform.models.config import ErnieModelArgs, MoEConfig
from kernels.expert_parallel import (
    allreduce_gradients,
    experts_per_rank,
    gather_experts,
    identity_placement,
    local_experts,
    new_expert_parallel_groups,
    shard_experts,
    slot_location,
    validate_placement,
)

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


def _scenarios() -> list[tuple[str, list[int] | None, bool]]:
    shuffled = torch.randperm(MODEL_KW["moe_num_experts"], generator=torch.Generator().manual_seed(3)).tolist()
    assert shuffled != sorted(shuffled)
    return [("identity", None, False), ("shuffled", shuffled, False), ("skewed", None, True)]


def _train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: EP=2 forward/backward on its half of the global batch for every scenario."""
    import torch.distributed as dist

    rank = dist.get_rank()
    ep_group, expert_dp_group = new_expert_parallel_groups(EP)  # world 2, EP 2: no expert-DP group
    local_ids = _global_batch().chunk(dist.get_world_size())[rank]
    results = {}
    for name, placement, skew in config["scenarios"]:
        model = _build_model(skew)
        shard_experts(model, ep_group, None if placement is None else torch.tensor(placement))
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
    torch.save(results, Path(config["out_dir"]) / f"rank{rank}.pt")


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
    for name, _, skew in scenarios:
        ref_loss, ref_grads, ref_load = _reference(skew)
        if skew:  # the scenario really left EP rank 1 without tokens
            assert ref_load[:, e // 2 :].sum() == 0
        per_rank = [r[name] for r in ranks]
        assert per_rank[0]["local_w13_shape"][0] == e // EP
        mean_loss = sum(r["loss"] for r in per_rank) / EP
        assert torch.allclose(mean_loss, ref_loss, rtol=0, atol=1e-5), (name, mean_loss, ref_loss)
        for r, res in enumerate(per_rank):
            assert res["grads"].keys() == ref_grads.keys()
            for pname, ref in ref_grads.items():
                got = res["grads"][pname]
                assert got.shape == ref.shape, (name, r, pname)
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6, msg=f"{name} rank{r} {pname}")
