"""`python -m workloads.pretrain [overrides]` — compose `conf/config.yaml` with Hydra and run pretraining.

Examples:
    python -m workloads.pretrain +stage=mm
    python -m workloads.pretrain model=ernie45_tiny_moe trainer.max_steps=4 run.name=try1

Until the staged Ray Train + DeepSpeed job lands (issue #5) this runs `ernie_platform.training.smoke.run_smoke`, a
short single-process training run of the selected model.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ernie_platform.configs import register_configs, validate_config

# The schemas must be in the ConfigStore before @hydra.main composes `conf/config.yaml`.
register_configs()


# config_path is resolved relative to this file (workloads/pretrain/ -> repo-root conf/), which is where an editable
# install leaves it.
@hydra.main(config_path="../../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    validate_config(cfg)
    from ernie_platform.training.smoke import run_smoke

    run_smoke(cfg)


if __name__ == "__main__":
    main()
