"""DeepSpeed strategy (ernie_platform/training/strategy.py): the config it derives from a TrainerConfig, and ZeRO-2
data parallelism on a real 2-worker Ray Train (gloo) run matching single-process AdamW on the same global batch."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
import torch
from omegaconf import OmegaConf

from ernie_platform.configs.schema import TrainerConfig
from ernie_platform.models import ErnieForCausalLM
from ernie_platform.models.config import ErnieModelArgs, MoEConfig
from ernie_platform.training.schedule import lr_at
from ernie_platform.training.strategy import (
    ADAMW_BETAS,
    build_optimizer,
    deepspeed_config,
    lr_lambda,
    router_tensors,
)

MODEL_KW = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    moe_num_experts=4,
    moe_k=2,
    moe_intermediate_size=16,
    moe_num_shared_experts=1,
)
WORLD = 2
STEPS = 3
INIT_SEED = 1234
# Large LR and a tight clip so the three steps move the weights visibly and clipping really acts (checked below).
BIAS_RATE = 1e-2  # aux-loss-free balancing on, so the all-reduced expert load is checked too
TRAIN_KW = dict(max_steps=STEPS, micro_batch_size=2, seq_len=16, lr=1e-2, warmup_steps=1, grad_clip=0.5)


def _model() -> ErnieForCausalLM:
    torch.manual_seed(INIT_SEED)
    # z / orthogonal coefficients non-zero so every router-loss path reaches the router's gradient.
    return ErnieForCausalLM(ErnieModelArgs(**MODEL_KW), MoEConfig(z_loss_coef=1e-3, orthogonal_loss_coef=1e-2))


def _global_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, MODEL_KW["vocab_size"], (WORLD * TRAIN_KW["micro_batch_size"], 16), generator=g)


# ---- deepspeed_config ------------------------------------------------------------------------------------------


def test_config_cpu_defaults() -> None:
    t = TrainerConfig(micro_batch_size=4, grad_accum_steps=3, grad_clip=0.7)
    cfg = deepspeed_config(t, world_size=2, use_gpu=False)
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 4 * 3 * 2
    assert cfg["gradient_clipping"] == 0.7
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["overlap_comm"] is False
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"] and "torch_autocast" not in cfg  # fp32
    assert "optimizer" not in cfg and "scheduler" not in cfg  # client AdamW + LambdaLR, no op builds


def test_config_gpu_uses_bf16_autocast_not_bf16_cast() -> None:
    cfg = deepspeed_config(TrainerConfig(), world_size=8, use_gpu=True)
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert not cfg["bf16"]["enabled"]  # the bf16 section would cast the fp32 router


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_config_zero_stage_from_config(stage: int) -> None:
    raw = {"micro_batch_size": 1, "zero_stage": stage}
    for t in (raw, OmegaConf.create(raw)):
        assert deepspeed_config(t, 1, False)["zero_optimization"]["stage"] == stage
    # A structured TrainerConfig without the field (struct mode) falls back to the default.
    assert deepspeed_config(OmegaConf.structured(TrainerConfig), 1, False)["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("bad", [4, -1, "2", 1.5, True])
def test_config_invalid_zero_stage(bad) -> None:
    with pytest.raises(ValueError, match="zero_stage.*" + re.escape(repr(bad))):
        deepspeed_config({"micro_batch_size": 1, "zero_stage": bad}, 1, False)


def test_lr_lambda_matches_smoke_schedule() -> None:
    t = TrainerConfig(max_steps=20, lr=3e-3, warmup_steps=5, min_lr_ratio=0.1)
    f = lr_lambda(t)
    for k in range(25):
        assert f(k) * t.lr == pytest.approx(lr_at(k, 20, 3e-3, 5, 0.1))
    opt, sched = build_optimizer(torch.nn.Linear(2, 2), t)
    assert opt.param_groups[0]["betas"] == ADAMW_BETAS and opt.param_groups[0]["weight_decay"] == t.weight_decay
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(k, 20, 3e-3, 5, 0.1) for k in range(3)])


def test_router_tensors_are_found() -> None:
    model = _model()
    names = set(router_tensors(model))
    layers = [i for i, layer in enumerate(model.model.layers) if layer.mlp in model.moe_blocks()]
    expected = {f"model.layers.{i}.mlp.gate.{n}" for i in layers for n in ("weight", "e_score_correction_bias")}
    assert layers and names == expected


# ---- ZeRO-2 on Ray Train vs single-process AdamW -------------------------------------------------------------------


def _train_loop_per_worker(config: dict) -> None:
    import os
    import time

    # Any JIT build would land here: the test asserts the folder stays empty.
    os.environ["TORCH_EXTENSIONS_DIR"] = config["ext_dir"]
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    from ernie_platform.training.strategy import build_engine, sync_expert_load

    rank, world = dist.get_rank(), dist.get_world_size()
    local_ids = _global_batch().chunk(world)[rank]
    t = TrainerConfig(**config["train_kw"])
    start = time.time()
    engine, _, sched = build_engine(_model(), t, world, use_gpu=False)
    init_s = time.time() - start
    losses, lrs = [], []
    for _ in range(STEPS):
        lrs.append(sched.get_last_lr()[0])
        out = engine(local_ids, labels=local_ids)
        engine.backward(out.loss)
        engine.step()
        sync_expert_load(engine.module)
        engine.module.update_expert_bias(BIAS_RATE)
        losses.append(out.loss.item())
    result = {
        "losses": losses,
        "lrs": lrs,
        "init_s": init_s,
        "zero": (engine.zero_optimization_stage(), type(engine.optimizer).__name__),
        "shm_op": ds_comm.comm.cdb.shm_comm_op is not None,
        "router_dtypes": {n: str(v.dtype) for n, v in router_tensors(engine.module).items()},
        "params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
        "biases": {n: b.clone() for n, b in engine.module.named_buffers() if n.endswith("e_score_correction_bias")},
    }
    torch.save(result, Path(config["out_dir"]) / f"rank{rank}.pt")


def _reference() -> tuple[list[float], list[float], dict[str, torch.Tensor], list[float]]:
    """One process: mean of the per-rank losses (= data parallelism's averaged gradient), clip, AdamW, LambdaLR, then
    the aux-free bias update from the load of the whole global batch. Returns losses, lrs, parameters and buffers
    (one dict), pre-clip gradient norms."""
    t = TrainerConfig(**TRAIN_KW)
    model = _model()
    opt, sched = build_optimizer(model, t)
    losses, lrs, norms = [], [], []
    for _ in range(STEPS):
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad(set_to_none=True)
        loss = sum(model(ids, labels=ids).loss for ids in _global_batch().chunk(WORLD)) / WORLD
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)))
        opt.step()
        sched.step()
        model.update_expert_bias(BIAS_RATE)
        losses.append(loss.item())
    state = {n: p.detach() for n, p in model.named_parameters()}
    state.update((n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    return losses, lrs, state, norms


@pytest.mark.integration
def test_zero2_on_ray_train_matches_single_process(ray_local, tmp_path: Path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out_dir, ext_dir = tmp_path / "results", tmp_path / "torch_extensions"
    out_dir.mkdir()
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"out_dir": str(out_dir), "ext_dir": str(ext_dir), "train_kw": TRAIN_KW},
        scaling_config=ScalingConfig(num_workers=WORLD, use_gpu=False, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="zero2"),
    )
    trainer.fit()
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    ref_losses, ref_lrs, ref_state, ref_norms = _reference()
    ref_biases = {n: ref_state.pop(n) for n in list(ref_state) if n.endswith("e_score_correction_bias")}
    ref_params = ref_state
    assert ref_biases and all(b.abs().sum() > 0 for b in ref_biases.values())  # the bias really moved
    assert ref_norms[0] > TRAIN_KW["grad_clip"]  # clipping is exercised
    assert not any(list(ext_dir.glob("**/*.so")))  # no JIT-built op
    for r, res in enumerate(ranks):
        assert not res["shm_op"], r
        assert res["zero"] == (2, "DeepSpeedZeroOptimizer"), res["zero"]
        assert set(res["router_dtypes"].values()) == {"torch.float32"}
        assert res["lrs"] == pytest.approx(ref_lrs, rel=1e-12)
    # Tolerance (fp32 throughout): the two runs differ only in summation order (gloo all-reduce of per-rank gradients
    # vs autograd summing the two halves, DeepSpeed's flat gradient buffers, the clip-norm reduction), ~1e-7 relative
    # per gradient. Adam's first steps are ~lr·sign(g), so that noise reaches the weights only through elements with
    # |g| near Adam's eps; measured: losses identical, max |Δparam| 7.4e-7. atol 1e-5 is 1e-3 of one lr=1e-2 step,
    # while a real mistake moves weights far more (measured on the reference: no clipping → 9e-3, lr +1% → 2e-2).
    mean_losses = [sum(res["losses"][k] for res in ranks) / WORLD for k in range(STEPS)]
    torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    for r, res in enumerate(ranks):
        assert res["params"].keys() == ref_params.keys()
        for name, ref in ref_params.items():
            torch.testing.assert_close(res["params"][name], ref, rtol=1e-4, atol=1e-5, msg=f"rank{r} {name}")
        assert res["biases"].keys() == ref_biases.keys()
        for name, ref in ref_biases.items():  # ±rate steps from integer loads: exact
            assert torch.equal(res["biases"][name], ref), (r, name, res["biases"][name], ref)
    assert any(not torch.equal(ref_params[n], p) for n, p in _model().named_parameters())  # training moved weights
