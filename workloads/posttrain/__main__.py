"""`python -m workloads.posttrain +algo=sft|dpo|rlvr|upo [model.path=DIR] [overrides]` — post-training on Ray Train.

Examples:
    python -m workloads.posttrain +algo=sft                                    # built-in arithmetic task
    python -m workloads.posttrain +algo=rlvr model.path=runs/ernie45-sft/export
    python -m workloads.posttrain +algo=dpo algo.finetune=lora data.source=pairs.jsonl
    ray job submit --working-dir . -- python -m workloads.posttrain +algo=sft

Hydra composes `conf/config.yaml` + `conf/algo/<name>.yaml` on the typed schema; `validate_config` adds the checks
Hydra leaves out; `ernie_platform.posttrain.job.run_posttraining` does the rest (docs/posttraining.md).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ernie_platform.configs import register_configs, validate_config

register_configs()


@hydra.main(config_path="../../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    validate_config(cfg)
    if cfg.algo.name is None:
        print("workloads.posttrain: choose an algorithm with +algo=sft|dpo|rlvr|upo", file=sys.stderr)
        sys.exit(2)
    from ernie_platform.posttrain.job import run_posttraining
    from ernie_platform.training.job import JobFailed

    try:
        run_posttraining(cfg)
    except JobFailed:
        sys.exit(1)  # the driver already printed the root cause


if __name__ == "__main__":
    main()
