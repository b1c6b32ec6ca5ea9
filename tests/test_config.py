"""Hydra configuration: composition, overrides, schema enforcement and every model preset."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig
from omegaconf.errors import ValidationError

from ernie_platform.configs import register_configs, to_model_args, validate_config
from ernie_platform.models.config import ErnieModelArgs

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
MODEL_PRESETS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def hydra_conf() -> Iterator[None]:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        yield


def _compose(*overrides: str) -> DictConfig:
    return compose(config_name="config", overrides=list(overrides))


def test_default_compose_is_demo_moe() -> None:
    cfg = _compose()
    assert cfg.model.name == "ernie45_demo_moe"
    assert cfg.model.path is None
    assert cfg.stage.name is None and cfg.stage.init_from is None and list(cfg.stage.phases) == []
    assert cfg.data.source == "builtin" and cfg.data.on_error == "raise"
    assert cfg.trainer.max_steps == 20 and cfg.trainer.num_workers == 2 and cfg.trainer.use_gpu is False
    assert cfg.run.name == "ernie45-demo" and cfg.run.storage_path == "./runs"
    assert cfg.moe.backend == "torch"
    args = to_model_args(cfg.model)
    assert args.is_moe and args.moe_num_experts == 16 and args.moe_k == 2
    assert args.vocab_size == 384 and args.num_hidden_layers == 6
    validate_config(cfg)


def test_overrides() -> None:
    cfg = _compose("model=ernie45_tiny_moe", "trainer.max_steps=4", "run.name=x", "trainer.lr=3e-4")
    assert cfg.model.name == "ernie45_tiny_moe"
    assert cfg.trainer.max_steps == 4
    assert cfg.trainer.lr == pytest.approx(3e-4)
    assert cfg.run.name == "x"


@pytest.mark.parametrize(
    ("override", "key"),
    [("trainer.bogus=1", "trainer.bogus"), ("model.bogus=1", "model.bogus"), ("run.nme=x", "run.nme")],
)
def test_unknown_key_rejected(override: str, key: str) -> None:
    with pytest.raises(ConfigCompositionException, match=key):
        _compose(override)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("trainer.use_gpu=maybe", "trainer.use_gpu"),
        ("model.hidden_size=1.5", "model.hidden_size"),
        ("model.eos_token_id=2", "model.eos_token_id"),
    ],
)
def test_wrong_type_rejected(override: str, key: str) -> None:
    with pytest.raises(ConfigCompositionException, match=key) as exc:
        _compose(override)
    assert isinstance(exc.value.__cause__, ValidationError)
    assert key in str(exc.value.__cause__)


@pytest.mark.parametrize(("override", "key"), [("+trainer.bogus=1", "trainer.bogus"), ("+bogus=1", "bogus")])
def test_appended_unknown_key_rejected_by_validate(override: str, key: str) -> None:
    cfg = _compose(override)  # Hydra's `+` bypasses the schema by design
    with pytest.raises(ValueError, match=key):
        validate_config(cfg)


def test_invalid_architecture_rejected_by_validate() -> None:
    cfg = _compose("model.num_attention_heads=3")
    with pytest.raises(ValueError, match="num_attention_heads"):
        validate_config(cfg)


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_every_model_preset_builds(preset: str) -> None:
    cfg = _compose(f"model={preset}")
    assert cfg.model.name == preset
    args = to_model_args(cfg.model)
    assert isinstance(args, ErnieModelArgs)
    validate_config(cfg)
    # round trip through the published config.json layout
    hf = args.to_hf_dict()
    assert ErnieModelArgs.from_hf_dict(hf).to_hf_dict() == hf


def test_presets_present() -> None:
    expected = {
        "ernie45_tiny_dense",
        "ernie45_tiny_moe",
        "ernie45_demo_moe",
        "ernie45_0p3b",
        "ernie45_21b_a3b",
        "ernie45_300b_a47b",
    }
    assert expected <= set(MODEL_PRESETS)


def test_published_architectures() -> None:
    a3b = to_model_args(_compose("model=ernie45_21b_a3b").model)
    assert (a3b.moe_num_experts, a3b.moe_k, a3b.moe_num_shared_experts) == (64, 6, 2)
    assert [i for i in range(a3b.num_hidden_layers) if a3b.is_moe_layer(i)] == list(range(1, 28))
    a47b = to_model_args(_compose("model=ernie45_300b_a47b").model)
    assert (a47b.moe_num_experts, a47b.moe_k, a47b.moe_num_shared_experts) == (64, 8, 0)
    assert [i for i in range(a47b.num_hidden_layers) if a47b.is_moe_layer(i)] == list(range(3, 54))
    assert not a47b.tie_word_embeddings
    dense = to_model_args(_compose("model=ernie45_0p3b").model)
    assert not dense.is_moe and dense.model_type == "ernie4_5" and dense.resolved_head_dim == 128


@pytest.mark.parametrize("stage", ["text", "long", "mm"])
def test_stage(stage: str) -> None:
    cfg = _compose(f"+stage={stage}")
    assert cfg.stage.name == stage
    assert cfg.run.name == f"ernie45-demo-{stage}"  # each stage exports where the next one looks
    assert cfg.model.name == ("ernie45_demo_vl" if stage == "mm" else "ernie45_demo_moe")
    validate_config(cfg)


def test_stages_chain_through_exports() -> None:
    text, long, mm = (_compose(f"+stage={s}", "run.storage_path=/data/r") for s in ("text", "long", "mm"))
    assert text.stage.init_from is None
    assert long.stage.init_from == f"/data/r/{text.run.name}/export"
    assert mm.stage.init_from == f"/data/r/{long.run.name}/export"


def test_long_stage_raises_context() -> None:
    cfg = _compose("model=ernie45_tiny_moe", "+stage=long")
    assert cfg.trainer.seq_len > _compose().trainer.seq_len
    assert cfg.stage.rope_theta == 500000.0
    assert cfg.trainer.seq_len <= cfg.model.max_position_embeddings


def test_mm_stage_phases_and_model_override() -> None:
    cfg = _compose("+stage=mm", "model=ernie45_tiny_vl", "trainer.max_steps=4")
    assert cfg.model.name == "ernie45_tiny_vl" and cfg.trainer.max_steps == 4  # overrides apply on top of a stage
    assert [p.name for p in cfg.stage.phases] == ["vision_warmup", "joint"]
    assert list(cfg.stage.phases[0].train) == ["vision", "resampler", "vision_experts"]
    validate_config(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.lr_schedule=linear"], "trainer.lr_schedule='linear'"),
        (["data.on_error=ignore"], "data.on_error='ignore'"),
        (["data.format=csv"], "data.format='csv'"),
        (["trainer.max_steps=0"], "trainer.max_steps=0"),
        (["trainer.decay_fraction=1.5"], "trainer.decay_fraction=1.5"),
        (["+stage=mm", "stage.phases.0.train=[vision,bogus]"], "stage.phases[0].train"),
        (["+stage=mm", "stage.phases.0.fraction=0.9"], "sum to at most 1"),
        (["+stage=mm", "model=ernie45_demo_moe"], "has no vision"),
        (["+stage=text", "+stage.lr_scale.vision=0.1"], "has no vision"),
        (["+stage=mm", "+stage.lr_scale.bogus=0.1"], "stage.lr_scale='bogus'"),
        (["+stage=mm", "stage.lr_scale.vision=-1"], "stage.lr_scale.vision=-1"),
        (["moe.expert_parallel_size=2"], "zero_stage=0"),
        (["moe.expert_parallel_size=3", "trainer.zero_stage=0"], "divisor of trainer.num_workers=2"),
        (["moe.rebalance_interval=5"], "moe.rebalance_interval=5 is not valid (expected 0 unless"),
        (["moe.num_redundant_experts=-1"], "moe.num_redundant_experts=-1"),
        (
            ["moe.expert_parallel_size=2", "trainer.zero_stage=0", "moe.num_redundant_experts=3"],
            "divisible by moe.expert_parallel_size=2",
        ),
        (
            ["moe.expert_parallel_size=2", "trainer.zero_stage=0", "moe.placement_policy=roundrobin"],
            "moe.placement_policy='roundrobin' is not valid (expected hierarchical | global | traffic_aware)",
        ),
    ],
)
def test_validate_rejects_bad_values(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_config(_compose(*overrides))
