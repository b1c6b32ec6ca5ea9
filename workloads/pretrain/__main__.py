"""`python -m workloads.pretrain [+stage=text|long|mm] [overrides]` — staged ERNIE 4.5 pretraining on Ray Train.

Examples:
    python -m workloads.pretrain +stage=mm                                   # the embedded default
    python -m workloads.pretrain +stage=text trainer.max_steps=200 run.name=my-text
    ray job submit --working-dir . -- python -m workloads.pretrain +stage=mm

Hydra composes `conf/config.yaml` (+ the stage file) on the typed schema; `validate_config` adds the checks Hydra
leaves out; `ernie_platform.training.job.run_pretraining` does the rest (docs/pretraining.md).
"""

from __future__ import annotations

import sys

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
    from ernie_platform.training.job import JobFailed, run_pretraining

    try:
        run_pretraining(cfg)
    except JobFailed:
        sys.exit(1)  # the driver already printed the root cause


if __name__ == "__main__":
    main()
