"""Typed Hydra schema of the platform configuration.

The YAML tree under `conf/` is composed on top of these dataclasses (registered in Hydra's ConfigStore by
`register_configs`), so an unknown key or a value of the wrong type is rejected at compose time with Hydra's own
error. Architecture *validation* (divisibility, MoE ranges, ...) is `ErnieModelArgs.validate`, which runs when the
`model` node is turned into an `ErnieModelArgs` by `to_model_args`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ernie_platform.models.config import ErnieModelArgs, MoEConfig

__all__ = [
    "Config",
    "ModelConfig",
    "MoEConfig",
    "RunConfig",
    "TrainerConfig",
    "register_configs",
    "to_model_args",
    "validate_config",
]


@dataclass
class ModelConfig(ErnieModelArgs):
    """Schema of the `model` group: the architecture plus where it comes from."""

    name: str = "ernie45_demo_moe"
    # Checkpoint directory (transformers layout). When set, the architecture is read from its config.json and the
    # architecture fields of this node are ignored.
    path: Optional[str] = None


@dataclass
class TrainerConfig:
    max_steps: int = 20
    num_workers: int = 2
    use_gpu: bool = False
    micro_batch_size: int = 8
    seq_len: int = 128
    grad_accum_steps: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay floor as a fraction of lr
    warmup_steps: int = 5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 1
    seed: int = 0


@dataclass
class RunConfig:
    name: str = "ernie45-demo"
    storage_path: str = "./runs"  # any local path or pyarrow/fsspec URI (s3://, gs://, ...)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    stage: Optional[str] = None  # name of the stage being run (conf/stage/*.yaml), None outside a staged run


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent): `config_schema` (root) and `model/model_schema`."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="model_schema", node=ModelConfig)


def to_model_args(cfg_model: Any) -> ErnieModelArgs:
    """The validated `ErnieModelArgs` of a composed `model` node (DictConfig, ModelConfig or plain mapping).

    `name` and `path` are dropped; resolving `path` (reading the checkpoint's config.json) is the model loader's job.
    """
    if isinstance(cfg_model, DictConfig):
        cfg_model = OmegaConf.to_container(cfg_model, resolve=True)
    elif dataclasses.is_dataclass(cfg_model) and not isinstance(cfg_model, type):
        cfg_model = dataclasses.asdict(cfg_model)
    return ErnieModelArgs.from_mapping(cfg_model)


def _unknown_keys(node: DictConfig, prefix: str) -> list[str]:
    schema = OmegaConf.get_type(node)
    fields = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    out: list[str] = []
    for key in node.keys():
        full = f"{prefix}{key}"
        if fields is not None and key not in fields:
            out.append(full)
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            out.extend(_unknown_keys(child, f"{full}."))
    return out


def validate_config(cfg: DictConfig) -> None:
    """Checks Hydra's compose leaves out; call before a job starts.

    Composition already rejects unknown keys and wrong types of plain overrides (`trainer.bogus=1`,
    `trainer.max_steps=abc`). Hydra's append syntax (`+trainer.bogus=1`) bypasses the schema by design, so keys
    added that way are rejected here; then the model node goes through `ErnieModelArgs.validate`.
    """
    unknown = _unknown_keys(cfg, "")
    if unknown:
        raise ValueError(f"config: unknown keys {unknown} (not in the schema, see ernie_platform/configs/schema.py)")
    to_model_args(cfg.model)
