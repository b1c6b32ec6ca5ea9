"""`python -m workloads.serve [model.path=DIR] [overrides]` — serve an ERNIE 4.5 model with an OpenAI-compatible API.

Examples:
    python -m workloads.serve                                        # newest local export, else the demo model
    python -m workloads.serve model.path=runs/ernie45-demo-text/export serve.port=8080
    python -m workloads.serve serve.mode=colocated serve.api_key=secret
    RAY_ADDRESS=local python -m workloads.serve                      # never join a running cluster

Hydra composes `conf/config.yaml` (`serve` group: `conf/serve/default.yaml`); `validate_config` adds the checks
Hydra leaves out; `ernie_platform.serving.run_server` serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ernie_platform.configs import register_configs, validate_config

# The schemas must be in the ConfigStore before @hydra.main composes `conf/config.yaml`.
register_configs()


@hydra.main(config_path="../../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    validate_config(cfg)
    from ernie_platform.serving import run_server

    run_server(cfg)


if __name__ == "__main__":
    main()
