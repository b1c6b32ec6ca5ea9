"""Hydra structured-config schema (`conf/` is composed on top of it)."""

from ernie_platform.configs.schema import (
    Config,
    DataConfig,
    ModelConfig,
    MoEConfig,
    PhaseConfig,
    RunConfig,
    ServeConfig,
    StageConfig,
    TrainerConfig,
    VisionSchema,
    register_configs,
    to_model_args,
    to_vl_config,
    validate_config,
)

__all__ = [
    "Config",
    "StageConfig",
    "PhaseConfig",
    "DataConfig",
    "ModelConfig",
    "MoEConfig",
    "RunConfig",
    "ServeConfig",
    "TrainerConfig",
    "VisionSchema",
    "register_configs",
    "to_model_args",
    "to_vl_config",
    "validate_config",
]
