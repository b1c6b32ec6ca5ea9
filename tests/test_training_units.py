"""Unit tests of the pretraining job's pure parts, in-process (no Ray cluster, no DeepSpeed engine).

schedule (LR schedules, stage phases, the per-group LambdaLR factor), strategy.build_optimizer (frozen groups keep
their weights bit for bit), stages (where a stage starts, growing text → VL, RoPE base, parameter groups, FLOPs),
tracking (a real SQLite MLflow store), job (progress line, config resolution, root cause) and checkpointing (RNG).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from ernie_platform.configs import register_configs
from ernie_platform.models import ErnieForCausalLM, flops_per_token, load_tokenizer, save_pretrained
from ernie_platform.models.vl.flops import count_vision_params
from ernie_platform.models.vl.model import ErnieVLForConditionalGeneration
from ernie_platform.training import checkpointing, job, stages, tracking
from ernie_platform.training.schedule import (
    PARAM_GROUPS,
    GroupLRFactor,
    lr_at,
    phase_at,
    phase_windows,
    schedule_fn,
    wsd_lr_at,
)
from ernie_platform.training.strategy import build_optimizer

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
ALL = frozenset(PARAM_GROUPS)


# --------------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.1),  # warm-up: lr * (step + 1) / warmup
        (4, 0.5),
        (9, 1.0),  # last warm-up step reaches lr
        (10, 1.0),  # cosine progress 0
        (55, 0.55),  # progress 45/90 = 0.5: 0.1 + 0.9 * 0.5
        (100, 0.1),  # floor lr * min_ratio
        (150, 0.1),  # stays at the floor past max_steps
    ],
)
def test_lr_at(step: int, expected: float) -> None:
    assert lr_at(step, 100, 1.0, 10, 0.1) == pytest.approx(expected, abs=1e-12)


def test_lr_at_cosine_quarter_and_scaling() -> None:
    # max_steps=50, warmup=10: step 20 is cosine progress 10/40 = 0.25
    expected = 2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(20, 50, 2.0, 10, 0.1) == pytest.approx(expected, rel=1e-12)
    assert lr_at(50, 50, 2.0, 10, 0.0) == pytest.approx(0.0, abs=1e-12)
    # monotone non-increasing after warm-up
    values = [lr_at(s, 50, 2.0, 10, 0.1) for s in range(9, 51)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.1),
        (9, 1.0),
        (10, 1.0),  # stable
        (79, 1.0),  # last stable step: decay is the last 20 of 100 steps (80..99)
        (80, 0.955),  # 1 - 0.9 * 1/20
        (89, 0.55),  # 1 - 0.9 * 10/20
        (99, 0.1),  # last step ends exactly at lr * min_ratio
        (120, 0.1),
    ],
)
def test_wsd_lr_at(step: int, expected: float) -> None:
    assert wsd_lr_at(step, 100, 1.0, 10, 0.1, 0.2) == pytest.approx(expected, abs=1e-12)


def test_wsd_zero_decay_fraction_is_constant() -> None:
    assert [wsd_lr_at(s, 100, 3.0, 10, 0.1, 0.0) for s in (10, 50, 99, 100, 500)] == [3.0] * 5
    assert wsd_lr_at(4, 100, 3.0, 10, 0.1, 0.0) == pytest.approx(1.5)  # warm-up still applies


def test_schedule_fn_cosine_and_wsd() -> None:
    base = {"lr": 1.0, "max_steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1}
    cos = schedule_fn({**base, "lr_schedule": "cosine"})
    assert cos(0) == pytest.approx(0.1) and cos(55) == pytest.approx(0.55) and cos(100) == pytest.approx(0.1)
    default = schedule_fn(base)  # no lr_schedule: cosine
    assert default(55) == pytest.approx(0.55)
    wsd = schedule_fn({**base, "lr_schedule": "wsd", "decay_fraction": 0.2})
    assert wsd(55) == pytest.approx(1.0) and wsd(89) == pytest.approx(0.55) and wsd(99) == pytest.approx(0.1)
    wsd_default = schedule_fn({**base, "lr_schedule": "wsd"})  # decay_fraction defaults to 0.2
    assert wsd_default(89) == pytest.approx(0.55)
    # an OmegaConf node works like a mapping
    node = OmegaConf.create({**base, "lr_schedule": "wsd", "decay_fraction": 0.5})
    assert schedule_fn(node)(50) == pytest.approx(1.0 - 0.9 * 1 / 50)


def test_schedule_fn_bad_name() -> None:
    with pytest.raises(ValueError, match="'linear'"):
        schedule_fn({"lr": 1.0, "max_steps": 10, "lr_schedule": "linear"})


def test_phase_windows_tile_and_expand_all() -> None:
    phases = [
        {"name": "warm", "fraction": 0.2, "train": ["vision", "resampler"]},
        {"name": "joint", "fraction": 0.8, "train": ["all"]},
    ]
    w = phase_windows(phases, 10)
    assert w == [
        ("warm", 0, 2, frozenset({"vision", "resampler"})),
        ("joint", 2, 10, frozenset({"text", "vision", "resampler", "vision_experts"})),
    ]
    assert phase_at(w, 0) == ("warm", frozenset({"vision", "resampler"}))
    assert phase_at(w, 1)[0] == "warm"
    assert phase_at(w, 2) == ("joint", ALL)
    assert phase_at(w, 9)[0] == "joint"


def test_phase_windows_rounding_tiles_and_rest_trains_everything() -> None:
    thirds = [
        {"name": "a", "fraction": 1 / 3, "train": ["text"]},
        {"name": "b", "fraction": 1 / 3, "train": ["vision"]},
    ]
    w = phase_windows(thirds, 10)
    # ends round(3.33) = 3 and round(6.67) = 7, then the rest trains everything
    assert [(n, s, e) for n, s, e, _ in w] == [("a", 0, 3), ("b", 3, 7), ("rest", 7, 10)]
    assert w[-1][3] == ALL
    for (_, _, end, _), (_, start, _, _) in zip(w, w[1:]):
        assert end == start
    assert w[0][1] == 0 and w[-1][2] == 10
    assert phase_at(w, 6) == ("b", frozenset({"vision"}))
    assert phase_at(w, 7) == ("rest", ALL)
    assert phase_at(w, 25) == ("rest", ALL)  # past max_steps: the last window


def test_phase_windows_empty() -> None:
    assert phase_windows([], 8) == [("all", 0, 8, ALL)]
    assert phase_at([], 3) == ("all", ALL)
    # a phase without `train` trains everything
    assert phase_windows([{"name": "p", "fraction": 0.5}], 4)[0] == ("p", 0, 2, ALL)


TRAINER = {"lr": 2.0, "max_steps": 10, "warmup_steps": 2, "min_lr_ratio": 0.1, "lr_schedule": "cosine"}
WARM_VISION = [{"name": "warm", "fraction": 0.3, "train": ["vision"]}]


def test_group_lr_factor_frozen_then_schedule() -> None:
    text = GroupLRFactor(TRAINER, WARM_VISION, "text")
    vision = GroupLRFactor(TRAINER, WARM_VISION, "vision")
    # window "warm" is steps 0..2: text frozen there
    assert [text(s) for s in range(3)] == [0.0, 0.0, 0.0]
    # step 3: cosine progress (3 - 2) / 8 → factor = 0.1 + 0.45 * (1 + cos(pi / 8))
    assert text(3) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 8)), rel=1e-12)
    assert text(10) == pytest.approx(0.1)
    # vision learns from the start: warm-up factor (step + 1) / 2
    assert vision(0) == pytest.approx(0.5) and vision(1) == pytest.approx(1.0)
    assert vision(3) == pytest.approx(text(3))
    sched = schedule_fn(TRAINER)
    assert all(vision(s) == pytest.approx(sched(s) / 2.0) for s in range(12))
    assert GroupLRFactor({**TRAINER, "lr": 0.0}, (), "text")(5) == 0.0


def test_group_lr_factor_scale_multiplies_the_schedule_and_respects_frozen_phases() -> None:
    text = GroupLRFactor(TRAINER, WARM_VISION, "text")
    slow = GroupLRFactor(TRAINER, WARM_VISION, "vision", scale=0.25)
    sched = schedule_fn(TRAINER)
    assert all(slow(s) == pytest.approx(0.25 * sched(s) / 2.0) for s in range(12))
    frozen_text = GroupLRFactor(TRAINER, WARM_VISION, "text", scale=3.0)
    assert [frozen_text(s) for s in range(3)] == [0.0, 0.0, 0.0]  # a frozen phase stays frozen whatever the scale
    assert frozen_text(5) == pytest.approx(3.0 * text(5))
    assert GroupLRFactor(TRAINER, (), "vision", scale=0.0)(5) == 0.0


def _is_plain(obj: Any) -> bool:
    if isinstance(obj, (str, int, float, bool, type(None))):
        return True
    if type(obj) in (list, tuple):
        return all(_is_plain(x) for x in obj)
    if type(obj) is dict:
        return all(isinstance(k, str) and _is_plain(v) for k, v in obj.items())
    return False


def test_group_lr_factor_picklable_and_lambdalr_state() -> None:
    factor = GroupLRFactor(TRAINER, WARM_VISION, "text")
    again = pickle.loads(pickle.dumps(factor))
    assert [again(s) for s in range(12)] == [factor(s) for s in range(12)]
    assert _is_plain(factor.__dict__)

    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for _ in range(4):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state["lr_lambdas"] == [factor.__dict__]  # the callable object's data is what gets checkpointed
    blob = pickle.dumps(state)
    # torch's safe loader accepts it too (plain containers only)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["lr_lambdas"] == [factor.__dict__]

    # restore into a scheduler built with another group's factor: it becomes the saved one
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=2.0)
    other = GroupLRFactor(TRAINER, WARM_VISION, "vision")
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, other)
    sched2.load_state_dict(pickle.loads(blob))
    assert other.group == "text" and sched2.last_epoch == 4
    assert other(1) == 0.0


def test_group_lr_factor_plain_with_omegaconf_phases() -> None:
    phases = OmegaConf.create(WARM_VISION)
    _, sched = build_optimizer(nn.Linear(2, 2), TRAINER, None, phases)
    assert _is_plain(sched.lr_lambdas[0].__dict__)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


# --------------------------------------------------------------------------------------------------- strategy


class _TwoPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _snapshot(mod: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in mod.parameters()]


def test_build_optimizer_frozen_group_keeps_weights() -> None:
    torch.manual_seed(0)
    model = _TwoPart()
    cfg = {"lr": 0.01, "max_steps": 4, "warmup_steps": 2, "min_lr_ratio": 0.1, "weight_decay": 0.1}
    groups = {"text": list(model.a.parameters()), "vision": list(model.b.parameters()), "resampler": []}
    phases = [{"name": "text_only", "fraction": 0.5, "train": ["text"]}]  # vision frozen for steps 0 and 1
    opt, sched = build_optimizer(model, cfg, groups, phases)
    assert [g["name"] for g in opt.param_groups] == ["text", "vision"]  # empty groups are dropped
    assert all(g["weight_decay"] == pytest.approx(0.1) for g in opt.param_groups)

    x = torch.randn(8, 4)
    y = torch.randn(8, 2)
    sched_fn = schedule_fn(cfg)
    # hand-computed: warm-up 0.005, 0.01; cosine from step 2 over 2 steps: 0.01, 0.01 * (0.1 + 0.9 * 0.5)
    expected_text = [0.005, 0.01, 0.01, 0.0055]
    expected_vision = [0.0, 0.0, 0.01, 0.0055]
    for step in range(4):
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs == pytest.approx([expected_text[step], expected_vision[step]], abs=1e-12)
        assert lrs[0] == pytest.approx(sched_fn(step))
        assert lrs[1] == (0.0 if step < 2 else pytest.approx(sched_fn(step)))
        before_a, before_b = _snapshot(model.a), _snapshot(model.b)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        assert loss.item() > 0
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        opt.step()
        sched.step()
        a_changed = [not torch.equal(b, p) for b, p in zip(before_a, model.a.parameters())]
        b_same = [torch.equal(b, p) for b, p in zip(before_b, model.b.parameters())]
        assert all(a_changed), f"text group did not move at step {step}"
        if step < 2:
            assert all(b_same), f"frozen group moved at step {step}"
        else:
            assert not any(b_same), f"unfrozen group did not move at step {step}"


def test_build_optimizer_lr_scale_per_group() -> None:
    model = _TwoPart()
    cfg = {"lr": 0.01, "max_steps": 4, "warmup_steps": 0, "min_lr_ratio": 0.1}
    groups = {"text": list(model.a.parameters()), "vision": list(model.b.parameters())}
    opt, sched = build_optimizer(model, cfg, groups, (), lr_scale={"vision": 0.0})
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.0])
    before_b = _snapshot(model.b)
    loss = model(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    assert all(torch.equal(a, b) for a, b in zip(before_b, _snapshot(model.b)))  # scale 0: never moves
    _, sched2 = build_optimizer(model, cfg, groups, (), lr_scale={"vision": 0.5})
    assert [g["lr"] for g in sched2.optimizer.param_groups] == pytest.approx([0.01, 0.005])


def test_build_optimizer_default_group_and_bad_schedule() -> None:
    model = _TwoPart()
    model.a.bias.requires_grad_(False)
    opt, sched = build_optimizer(model, {"lr": 0.5, "max_steps": 10, "warmup_steps": 1})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["name"] == "text"
    assert {id(p) for p in opt.param_groups[0]["params"]} == {
        id(model.a.weight),
        id(model.b.weight),
        id(model.b.bias),
    }
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # warmup 1: full lr at step 0
    with pytest.raises(ValueError, match="'step'"):
        build_optimizer(model, {"lr": 0.5, "max_steps": 10, "lr_schedule": "step"})


# --------------------------------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def hydra_conf() -> Iterator[None]:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        yield


def _cfg(*overrides: str) -> dict[str, Any]:
    cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def text_export(hydra_conf: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[ErnieForCausalLM, Path]:
    """A tiny text MoE model (non-trivial router biases) and its export directory."""
    root = tmp_path_factory.mktemp("text_export")
    model, _, start = stages.build_stage_model(_cfg("model=ernie45_tiny_moe", f"run.storage_path={root}"))
    assert start.source == "scratch"
    with torch.no_grad():
        for blk in model.moe_blocks():
            blk.gate.e_score_correction_bias.normal_(std=0.05)
    out = root / "export"
    save_pretrained(model, out, tokenizer=load_tokenizer(None))
    return model.eval(), out


@pytest.fixture(scope="module")
def vl_scratch(hydra_conf: None, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("vl_scratch")
    cfg = _cfg("+stage=mm", "model=ernie45_tiny_vl", f"run.storage_path={root}")
    return cfg, *stages.build_stage_model(cfg)


def _inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return torch.tensor([1.0 / theta ** (2 * i / head_dim) for i in range(head_dim // 2)], dtype=torch.float32)


def test_start_plan_from_scratch_names_missing_export(hydra_conf: None, tmp_path: Path) -> None:
    cfg = _cfg("+stage=long", "model=ernie45_tiny_moe", f"run.storage_path={tmp_path}")
    missing = f"{tmp_path}/ernie45-demo-text/export"
    assert cfg["stage"]["init_from"] == missing
    plan = stages.start_plan(cfg)
    assert "from scratch" in plan and missing in plan and "ernie45_tiny_moe" in plan and "stage long" in plan
    plain = _cfg("model=ernie45_tiny_moe", f"run.storage_path={tmp_path}")
    assert stages.start_plan(plain) == (
        "stage pretrain: no stage.init_from / model.path; training ernie45_tiny_moe from scratch"
    )
    # a directory without config.json is not an export
    Path(missing).mkdir(parents=True)
    assert "from scratch" in stages.start_plan(cfg)


def test_build_stage_model_scratch_text_with_rope_theta(hydra_conf: None, tmp_path: Path) -> None:
    cfg = _cfg("+stage=long", "model=ernie45_tiny_moe", f"run.storage_path={tmp_path}")
    model, tok, start = stages.build_stage_model(cfg)
    assert type(model) is ErnieForCausalLM and not stages.is_vl(model)
    assert start.source == "scratch" and start.path is None and start.new_parameters == 0
    assert "from scratch" in start.message and f"{tmp_path}/ernie45-demo-text/export" in start.message
    assert model.args.rope_theta == 500000.0
    assert torch.allclose(model.model.rotary_emb.inv_freq, _inv_freq(16, 500000.0), rtol=1e-6, atol=0)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(tok) <= model.args.vocab_size


def test_build_stage_model_scratch_vl(vl_scratch) -> None:
    cfg, model, _, start = vl_scratch
    assert type(model) is ErnieVLForConditionalGeneration and stages.is_vl(model)
    assert start.source == "scratch" and "from scratch" in start.message
    assert cfg["stage"]["init_from"] in start.message
    assert model.cfg.text.rope_theta == 500000.0  # mm stage raises it
    rot = model.model.language_model.rotary_emb
    assert torch.allclose(rot.inv_freq_J, _inv_freq(16, 500000.0), rtol=1e-6, atol=0)


def test_stage_long_loads_text_export(hydra_conf: None, text_export, tmp_path: Path) -> None:
    text, export = text_export
    cfg = _cfg("+stage=long", "model=ernie45_tiny_moe", f"run.storage_path={tmp_path}", f"stage.init_from={export}")
    assert stages.start_plan(cfg) == f"stage long: starting from {export}"
    model, _, start = stages.build_stage_model(cfg)
    assert start.source == "checkpoint" and start.path == str(export) and start.new_parameters == 0
    assert type(model) is ErnieForCausalLM
    ref = text.state_dict()
    got = model.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    assert text.args.rope_theta == 10000.0 and model.args.rope_theta == 500000.0
    assert torch.allclose(model.model.rotary_emb.inv_freq, _inv_freq(16, 500000.0), rtol=1e-6, atol=0)


def test_stage_mm_grows_text_export(hydra_conf: None, text_export, tmp_path: Path) -> None:
    text, export = text_export
    cfg = _cfg(
        "+stage=mm",
        "model=ernie45_tiny_vl",
        f"run.storage_path={tmp_path}",
        f"stage.init_from={export}",
        "stage.rope_theta=null",
    )
    model, _, start = stages.build_stage_model(cfg)
    assert type(model) is ErnieVLForConditionalGeneration
    assert start.source == "grown" and start.path == str(export)
    new = [p for n, p in model.named_parameters() if n.startswith(("model.vision_tower.", "model.resampler_model."))]
    new += [p for n, p in model.named_parameters() if ".vision_moe." in n]
    assert start.new_parameters == sum(p.numel() for p in new) > 0
    assert "grown" in start.message and "ernie45_tiny_vl" in start.message
    assert model.cfg.text.rope_theta == 10000.0
    ids = torch.randint(16, 272, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = text.eval()(ids).logits
        out = model.eval()(ids).logits
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-5


def test_stage_mm_grows_with_raised_rope_theta(hydra_conf: None, text_export, tmp_path: Path) -> None:
    _, export = text_export
    cfg = _cfg("+stage=mm", "model=ernie45_tiny_vl", f"run.storage_path={tmp_path}", f"stage.init_from={export}")
    model, _, start = stages.build_stage_model(cfg)
    assert start.source == "grown"
    assert model.cfg.text.rope_theta == 500000.0
    rot = model.model.language_model.rotary_emb
    assert torch.allclose(rot.inv_freq_J, _inv_freq(16, 500000.0), rtol=1e-6, atol=0)


def test_vl_checkpoint_into_text_stage_raises(hydra_conf: None, vl_scratch, tmp_path: Path) -> None:
    _, vl_model, _, _ = vl_scratch
    out = tmp_path / "vl_export"
    save_pretrained(vl_model, out, tokenizer=load_tokenizer(None))
    cfg = _cfg("+stage=long", "model=ernie45_tiny_moe", f"run.storage_path={tmp_path}", f"stage.init_from={out}")
    with pytest.raises(ValueError, match="VL checkpoint"):
        stages.build_stage_model(cfg)


def test_model_path_without_checkpoint(hydra_conf: None, tmp_path: Path) -> None:
    cfg = _cfg("model=ernie45_tiny_moe", f"model.path={tmp_path}", f"run.storage_path={tmp_path}")
    with pytest.raises(FileNotFoundError, match="config.json"):
        stages.build_stage_model(cfg)


def _expected_group(name: str) -> str:
    if name.startswith("model.vision_tower."):
        return "vision"
    if name.startswith("model.resampler_model."):
        return "resampler"
    if ".vision_moe." in name:
        return "vision_experts"
    return "text"


def test_param_groups_vl_partition(vl_scratch) -> None:
    _, model, _, _ = vl_scratch
    groups = stages.param_groups(model)
    assert set(groups) == {"text", "vision", "resampler", "vision_experts"}
    where: dict[int, str] = {}
    for g, params in groups.items():
        for p in params:
            assert id(p) not in where, "parameter in two groups"
            where[id(p)] = g
    named = dict(model.named_parameters())
    assert set(where) == {id(p) for p in named.values() if p.requires_grad}
    for n, p in named.items():
        assert where[id(p)] == _expected_group(n), n
    assert any(".vision_moe.gate." in n for n, p in named.items() if where[id(p)] == "vision_experts")


def test_param_groups_skip_frozen_and_text_model(text_export) -> None:
    text, _ = text_export
    groups = stages.param_groups(text)
    assert list(groups) == ["text"]
    assert [id(p) for p in groups["text"]] == [id(p) for p in text.parameters()]
    frozen = text.model.embed_tokens.weight
    frozen.requires_grad_(False)
    try:
        assert all(p is not frozen for p in stages.param_groups(text)["text"])
    finally:
        frozen.requires_grad_(True)


def test_flops(text_export, vl_scratch) -> None:
    text, _ = text_export
    _, vl, _, _ = vl_scratch
    assert stages.train_flops_per_token(text, 128) == flops_per_token(text.args, 128)
    # attention term: 3 * 2 * 2 * layers(3) * heads(4) * head_dim(16) per token of context
    attn_per_ctx = 3 * 2 * 2 * 3 * 4 * 16
    assert stages.train_flops_per_token(text, 256) - stages.train_flops_per_token(text, 128) == 128 * attn_per_ctx
    vl_flops = stages.train_flops_per_token(vl, 128)
    assert vl_flops > 0
    assert stages.train_flops_per_token(vl, 256) - vl_flops == 128 * attn_per_ctx
    assert stages.vision_flops_per_image_token(text) == 0.0
    merge = vl.cfg.vision.spatial_merge_size
    assert stages.vision_flops_per_image_token(vl) == 6 * count_vision_params(vl.cfg) * merge * merge > 0


# --------------------------------------------------------------------------------------------------- tracking


def _run_cfg(name: str, storage: Path, max_steps: int = 4) -> dict[str, Any]:
    return {
        "run": {"name": name, "experiment": "unit", "storage_path": str(storage)},
        "model": {"name": "ernie45_tiny_moe"},
        "stage": {"name": "text"},
        "trainer": {"max_steps": max_steps},
    }


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # MLflow's default artifact root (./mlruns) for experiments created here
        yield f"sqlite:///{root}/mlflow.db", root


def test_open_run_create_reopen_and_params(mlflow_store: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    uri, root = mlflow_store
    monkeypatch.chdir(root)
    cfg = _run_cfg("unit-a", root)
    run_id, reopened = tracking.open_run(cfg, uri)
    assert reopened is False
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.tags[tracking.RUN_NAME_TAG] == "unit-a"
    assert run.data.tags["ernie.stage"] == "text" and run.data.tags["ernie.model"] == "ernie45_tiny_moe"
    assert run.data.params == {
        "run.name": "unit-a",
        "run.experiment": "unit",
        "run.storage_path": str(root),
        "model.name": "ernie45_tiny_moe",
        "stage.name": "text",
        "trainer.max_steps": "4",
    }
    arts = [a.path for a in client.list_artifacts(run_id, "config")]
    assert len(arts) == 1 and arts[0].startswith("config/resolved-") and arts[0].endswith(".yaml")
    local = client.download_artifacts(run_id, arts[0], str(root))
    assert yaml.safe_load(Path(local).read_text()) == cfg

    rerun = _run_cfg("unit-a", root, max_steps=8)
    rerun["trainer"]["lr"] = 0.5
    run_id2, reopened2 = tracking.open_run(rerun, uri)
    assert run_id2 == run_id and reopened2 is True
    run = client.get_run(run_id)
    assert run.data.params["trainer.max_steps"] == "4"  # params are immutable
    assert run.data.tags["changed.trainer.max_steps"] == "8"
    assert run.data.params["trainer.lr"] == "0.5"  # a new key is a new param
    assert not any(k.startswith("changed.") and k != "changed.trainer.max_steps" for k in run.data.tags)

    other, reopened3 = tracking.open_run(_run_cfg("unit-b", root), uri)
    assert other != run_id and reopened3 is False


def test_rank_zero_logger_metric_history(mlflow_store: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    uri, root = mlflow_store
    monkeypatch.chdir(root)
    run_id, _ = tracking.open_run(_run_cfg("unit-metrics", root), uri)
    logger = tracking.RankZeroLogger(uri, run_id, system_metrics=False)
    try:
        assert logger._monitor is None
        logger.log({"a": 1.0}, step=3)
        assert tracking.metric_history(uri, run_id, ["a"]) == {"a": [(3, 1.0)]}
        logger.log({"a": 0.5, "b": 2}, step=1)
        hist = tracking.metric_history(uri, run_id, ["a", "b"])
        assert hist == {"a": [(1, 0.5), (3, 1.0)], "b": [(1, 2.0)]}
    finally:
        logger.close()


def test_flatten() -> None:
    assert tracking.flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2]}) == {
        "a.b": "1",
        "a.c.d": "None",
        "e": "[1, 2]",
    }
    assert len(tracking.flatten({"x": "y" * 10000})["x"]) == tracking.MAX_PARAM_LEN


def test_default_tracking_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking.default_tracking_uri(str(tmp_path)) == "http://tracking:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    store = tmp_path / "store" / "nested"
    assert tracking.default_tracking_uri(str(store)) == f"sqlite:///{store.resolve()}/mlflow.db"
    assert store.is_dir()
    monkeypatch.chdir(tmp_path)
    assert tracking.default_tracking_uri("rel") == f"sqlite:///{tmp_path.resolve()}/rel/mlflow.db"
    assert tracking.default_tracking_uri(f"file://{store}") == f"sqlite:///{store.resolve()}/mlflow.db"
    # object storage: the database stays beside the driver
    assert tracking.default_tracking_uri("s3://bucket/runs") == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


# --------------------------------------------------------------------------------------------------- job


def test_progress_line() -> None:
    rec = {"step": 3, "max_steps": 10, "loss": 2.345678, "tokens_per_s": 12345.6, "eta_s": 75.4}
    line = job.progress_line("demo", rec)
    assert line == "[demo] step 3/10 (30%) | loss 2.3457 | 12,346 tok/s | ETA 1m15s"
    for part in ("step 3/10", "loss", "tok/s", "ETA"):
        assert part in line
    assert job.progress_line("demo", {**rec, "eta_s": 9.9, "phase": "all"}).endswith("| ETA 9s")
    assert job.progress_line("demo", {**rec, "phase": "vision_warmup"}).endswith("| ETA 1m15s | vision_warmup")


def test_resolve_makes_paths_absolute(hydra_conf: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = compose(config_name="config", overrides=["+stage=long", "run.storage_path=rel_runs"])
    plain = job.resolve(cfg)
    assert isinstance(plain, dict)
    assert plain["run"]["storage_path"] == str(tmp_path.resolve() / "rel_runs")
    assert plain["stage"]["init_from"] == str(tmp_path.resolve() / "rel_runs" / "ernie45-demo-text" / "export")
    uri = job.resolve({"run": {"storage_path": "s3://bucket/runs"}, "stage": {"init_from": "s3://bucket/x"}})
    assert uri["run"]["storage_path"] == "s3://bucket/runs" and uri["stage"]["init_from"] == "s3://bucket/x"


def test_root_cause() -> None:
    msg = (
        "Training errored after 0 iterations\n"
        "ray.exceptions.RayTaskError(DataError): ray::_RayTrainWorker__execute.get_next()\n"
        "Traceback (most recent call last):\n"
        '  File "loop.py", line 12, in train_loop_per_worker\n'
        "    raise DataError(...)\n"
        "DataError: f.jsonl:3: invalid JSON (Expecting value)\n"
        "\n"
        "The above exception was the direct cause of the following exception:\n"
        "TrainingFailedError: worker group failed"
    )
    assert job._root_cause(RuntimeError(msg)) == "DataError: f.jsonl:3: invalid JSON (Expecting value)"
    assert job._root_cause(RuntimeError("first\nsecond line\n")) == "second line"
    assert job._root_cause(KeyError()) == "KeyError"


# --------------------------------------------------------------------------------------------------- checkpointing


def _draw() -> tuple[list[float], float, float, list[float], float]:
    return (
        torch.rand(5).tolist(),
        random.random(),
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        float(np.random.randn()),
    )


def test_rng_state_round_trip_through_json() -> None:
    random.gauss(0, 1)  # leave a cached gaussian in python's and numpy's generators
    np.random.randn()
    state = json.loads(json.dumps(checkpointing.rng_state()))
    first = _draw()
    second = _draw()
    assert first != second
    checkpointing.set_rng_state(state)
    assert _draw() == first
    assert _draw() == second
