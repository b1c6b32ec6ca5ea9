"""DeepSpeed layer of the Ray Train pretraining job: the DeepSpeed config of a `TrainerConfig` and the engine.

Each Ray Train worker (TorchTrainer, process group already initialised by Ray: gloo on CPU, nccl on GPU) calls
`build_engine(model, cfg.trainer, world_size, use_gpu)` and then trains with the engine::

    engine, opt, sched = build_engine(model, cfg.trainer, ray.train.get_context().get_world_size(), use_gpu)
    for step in range(max_steps):
        for _ in range(grad_accum_steps):
            out = engine(ids, labels=ids)
            engine.backward(out.loss)  # DeepSpeed divides by gradient_accumulation_steps itself
            engine.step()              # optimizer + LR scheduler step only at the accumulation boundary
        if moe_cfg.bias_update_rate:
            sync_expert_load(engine.module)  # all-reduce the routed load so every rank moves the same bias
            engine.module.update_expert_bias()

Choices (all made in `deepspeed_config` / `build_engine`):

* Optimizer: torch's `AdamW` (betas 0.9/0.95) passed to `deepspeed.initialize` as a client optimizer.
  DeepSpeed's own `"optimizer": {"type": "AdamW"}` resolves to `FusedAdam` (and to `DeepSpeedCPUAdam` with ZeRO
  offload); on a CPU accelerator both are C++ ops that DeepSpeed JIT-compiles on first use (no prebuilt ops in this
  install: `git_version_info_installed.installed_ops` is all False). torch's AdamW needs no build, is on ZeRO's
  supported-optimizer list, and ZeRO 1/2 shards its state like any other optimizer's.
* LR schedule: `schedule.schedule_fn` (warm-up + cosine or WSD) as a `LambdaLR` on that optimizer, handed to
  DeepSpeed as the client scheduler so `engine.step()` advances it once per optimizer step: step k uses the
  schedule's value at k. With parameter groups (the VL stage's vision tower, resampler, vision experts and the text
  model) each group has its own factor, 0 while a stage phase freezes it (`schedule.GroupLRFactor`).
* Precision: fp32 on CPU (bf16 is slow there). On GPU, bf16 through DeepSpeed's `torch_autocast` section rather
  than its `bf16` section: the `bf16` section calls `module.bfloat16()`, which would also cast the router's fp32
  `gate.weight` and its `e_score_correction_bias` buffer. With `torch_autocast` the parameters (and the
  optimizer's master weights) stay fp32, the matmuls run in bf16 under autocast, and `Router.forward` disables
  autocast, so routing logits, softmax, top-k and the bias stay fp32. `build_engine` checks after initialisation
  that every router parameter and buffer is still fp32. DeepSpeed's autocast default reduces the gradients of
  `nn.Linear` parameters in bf16 (`lower_precision_safe_modules`); the router and the stacked expert weights are not
  `nn.Linear` and reduce in fp32. Cost: every rank holds the full weights in fp32 (4 B/param) instead of bf16
  (2 B/param), and autocast re-casts them to bf16 in each forward. Verified only with CPU autocast (world size 1:
  ZeRO-2 engine, `lm_head` output bf16, router output and all parameters fp32); no GPU was available for this.
* ZeRO stage from `trainer.zero_stage` (default 2, 0-3 accepted). `overlap_comm` is off on CPU (no streams).

Shared-memory comm op (measured on this 2-core machine, DeepSpeed 0.19.8, torch 2.13 CPU):

* Yes, a JIT build happens. `deepspeed.init_distributed()` — also called inside `deepspeed.initialize()` — creates
  `deepspeed.comm.torch.TorchBackend`, whose `__init__` calls `build_shm_op()` unconditionally whenever the CPU
  accelerator reports `ShareMemCommBuilder` compatible (Linux + a C++ compiler). That holds even when Ray already
  initialised a gloo process group and `dist_backend="gloo"` is passed: the backend name does not gate the build,
  and DeepSpeed 0.19 has no environment variable to switch it off (`DS_BUILD_SHM_COMM` only affects `pip install`;
  `DS_ACCELERATOR=cpu` only picks the accelerator, which is CPU here anyway; `CCL_*` only matter with oneCCL).
* Time, first (uncached) build: 27.7 s wall (47 s CPU) for `init_distributed` in one process on idle cores; 41 s in
  `build_engine` of each of 2 Ray Train workers (one compiles, the other waits on torch's build lock), i.e. a 60 s
  `fit()` instead of 19 s; minutes when the 2 cores are busy. Cached: the `.so` lands in
  `~/.cache/torch_extensions/py311_cpu/deepspeed_shm_comm/` (or `$TORCH_EXTENSIONS_DIR`) and every later process or
  run just loads it (0.06 s; `build_engine` 3.0 s with or without it).
* The op is used only by `inference_all_reduce` (DeepSpeed inference / AutoTP); training's gradient reduction goes
  through torch.distributed. So `build_engine` (via `init_deepspeed_comm`) skips it on CPU by replacing
  `deepspeed.comm.torch.build_shm_op` with a function returning None while the backend is created — the very path
  DeepSpeed itself takes when the op is incompatible — and restores it afterwards. Nothing is compiled, nothing is
  cached, and `~/.cache/torch_extensions` does not need to exist in CI. Pass `allow_shm_op=True` to keep it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ernie_platform.training.schedule import GroupLRFactor, schedule_fn

DEFAULT_ZERO_STAGE = 2
ADAMW_BETAS = (0.9, 0.95)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """`cfg.key` for a dataclass / DictConfig (struct or not) / plain mapping, else `default`."""
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    try:
        value = getattr(cfg, key)
    except (AttributeError, KeyError):  # omegaconf's ConfigAttributeError is an AttributeError
        return default
    return default if value is None else value


def zero_stage_of(trainer_cfg: Any) -> int:
    """The ZeRO stage of `trainer_cfg.zero_stage` (default 2); ValueError unless it is an int in 0..3."""
    stage = _get(trainer_cfg, "zero_stage", DEFAULT_ZERO_STAGE)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
        raise ValueError(f"trainer.zero_stage must be one of 0, 1, 2, 3; got {stage!r}")
    return stage


def deepspeed_config(trainer_cfg: Any, world_size: int, use_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for `trainer_cfg` (a `TrainerConfig`, its DictConfig or a mapping).

    No `optimizer` / `scheduler` sections: `build_engine` passes torch's AdamW and a LambdaLR over `smoke.lr_at` as
    client objects (see the module docstring for why)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    micro = int(_get(trainer_cfg, "micro_batch_size"))
    accum = int(_get(trainer_cfg, "grad_accum_steps", 1))
    stage = zero_stage_of(trainer_cfg)
    zero: dict[str, Any] = {"stage": stage}
    if stage > 0:
        zero.update(contiguous_gradients=True, overlap_comm=bool(use_gpu), reduce_scatter=True)
    config: dict[str, Any] = {
        "train_batch_size": micro * accum * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(_get(trainer_cfg, "grad_clip", 0.0)),
        "zero_optimization": zero,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},  # never: it would cast the fp32 router (see module docstring)
        "steps_per_print": 10**9,  # the job logs itself
        "wall_clock_breakdown": False,
    }
    if use_gpu:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


def lr_lambda(trainer_cfg: Any) -> Any:
    """The `LambdaLR` factor of step k: schedule(k) / lr (warm-up then cosine or WSD to `min_lr_ratio`)."""
    if float(_get(trainer_cfg, "lr")) <= 0:
        return lambda step: 0.0
    return GroupLRFactor(_trainer_mapping(trainer_cfg), (), "text")


def _trainer_mapping(trainer_cfg: Any) -> dict[str, Any]:
    keys = ("lr", "max_steps", "warmup_steps", "min_lr_ratio", "lr_schedule", "decay_fraction")
    return {k: _get(trainer_cfg, k) for k in keys if _get(trainer_cfg, k) is not None}


def build_optimizer(
    model: torch.nn.Module,
    trainer_cfg: Any,
    param_groups: Mapping[str, list[torch.nn.Parameter]] | None = None,
    phases: Any = (),
    lr_scale: Mapping[str, float] | None = None,
) -> tuple[torch.optim.Optimizer, Any]:
    """torch AdamW and its LambdaLR. `param_groups` (name -> parameters, names from `schedule.PARAM_GROUPS`) gives
    one optimizer group each, frozen (factor 0) outside the `phases` that train it and with its learning rate
    multiplied by `lr_scale[name]` (default 1); None: one group of every trainable parameter."""
    if param_groups is None:
        param_groups = {"text": [p for p in model.parameters() if p.requires_grad]}
    groups = [(name, params) for name, params in param_groups.items() if params]
    opt = torch.optim.AdamW(
        [{"params": params, "name": name} for name, params in groups],
        lr=float(_get(trainer_cfg, "lr")),
        weight_decay=float(_get(trainer_cfg, "weight_decay", 0.0)),
        betas=ADAMW_BETAS,
    )
    cfg = _trainer_mapping(trainer_cfg)
    schedule_fn(cfg)  # validates lr_schedule
    phases = [dict(p) if isinstance(p, Mapping) else _plain_phase(p) for p in phases]
    scale = dict(lr_scale or {})
    factors = [GroupLRFactor(cfg, phases, name, float(scale.get(name, 1.0))) for name, _ in groups]
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factors)


def _plain_phase(p: Any) -> dict[str, Any]:
    return {"name": _get(p, "name", "phase"), "fraction": _get(p, "fraction", 1.0), "train": list(_get(p, "train"))}


@contextlib.contextmanager
def _shm_op_disabled(disable: bool) -> Iterator[None]:
    if not disable:
        yield
        return
    # Not `import deepspeed.comm.torch as m`: that resolves the attribute `deepspeed.comm.torch`, which is torch.
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    original = ds_torch.build_shm_op
    ds_torch.build_shm_op = _no_shm_op
    try:
        yield
    finally:
        ds_torch.build_shm_op = original


def _no_shm_op() -> None:
    return None


def init_deepspeed_comm(use_gpu: bool, allow_shm_op: bool = False) -> None:
    """`deepspeed.init_distributed` on top of the process group Ray Train created (gloo on CPU, nccl on GPU),
    without JIT-building the CPU shared-memory comm op unless `allow_shm_op` (see module docstring)."""
    import deepspeed
    import deepspeed.comm as ds_comm

    if ds_comm.is_initialized():
        return
    with _shm_op_disabled(not use_gpu and not allow_shm_op):
        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def router_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every router parameter and buffer (`*.gate.weight`, `*.gate.e_score_correction_bias`) by name."""
    from ernie_platform.models.moe import Router

    found: dict[str, torch.Tensor] = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, Router):
            for name, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
                found[f"{mod_name}.{name}"] = t
    return found


def build_engine(
    model: torch.nn.Module,
    trainer_cfg: Any,
    world_size: int,
    use_gpu: bool,
    allow_shm_op: bool = False,
    param_groups: Mapping[str, list[torch.nn.Parameter]] | None = None,
    phases: Any = (),
    lr_scale: Mapping[str, float] | None = None,
) -> tuple[Any, Any, Any]:
    """Wrap `model` in a DeepSpeed engine: returns `(engine, optimizer, lr_scheduler)` from `deepspeed.initialize`.

    Call inside a worker whose torch.distributed group is up (Ray Train). The model must be fp32; on GPU it is moved
    to the local device by DeepSpeed and runs under bf16 autocast with fp32 router (checked here)."""
    import deepspeed

    bad = {n: t.dtype for n, t in router_tensors(model).items() if t.dtype != torch.float32}
    if bad:
        raise ValueError(f"router parameters/buffers must be fp32 before build_engine: {bad}")
    init_deepspeed_comm(use_gpu, allow_shm_op)
    config = deepspeed_config(trainer_cfg, world_size, use_gpu)
    opt, sched = build_optimizer(model, trainer_cfg, param_groups, phases, lr_scale)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=config, dist_init_required=False
    )
    bad = {n: t.dtype for n, t in router_tensors(engine.module).items() if t.dtype != torch.float32}
    if bad:
        raise RuntimeError(f"DeepSpeed changed router dtypes (must stay fp32): {bad}")
    return engine, optimizer, scheduler


@torch.no_grad()
def sync_expert_load(model: torch.nn.Module, group: Any = None) -> None:
    """All-reduce (sum) every MoE block's `load_since_update_E` so the aux-loss-free bias update is identical on all
    data-parallel ranks (call right before `model.update_expert_bias()`)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    for mod in model.modules():
        load = getattr(mod, "load_since_update_E", None)
        if isinstance(load, torch.Tensor):
            dist.all_reduce(load, group=group)
