"""`python -m workloads.serve [model.path=DIR] [overrides]` — serve an ERNIE 4.5 model with an OpenAI-compatible API.

Examples:
    python -m workloads.serve                                        # newest local export, else the demo model
    python -m workloads.serve model.path=runs/ernie45-demo-text/export serve.port=8080
    ERNIE_API_KEY=secret python -m workloads.serve serve.mode=colocated     # clients send Authorization: Bearer secret
    python -m workloads.serve serve.api_key_file=/run/secrets/ernie-api-key  # or the key in a file
    RAY_ADDRESS=local python -m workloads.serve                      # never join a running cluster

Hydra composes `conf/config.yaml` (`serve` group: `conf/serve/default.yaml`); `validate_config` adds the checks
Hydra leaves out; `ernie_platform.serving.run_server` serves until SIGINT/SIGTERM. `serve.api_key=...` on the
command line is refused before Hydra starts: Hydra would write it to outputs/.../.hydra/ (serving/auth.py).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ernie_platform.configs import register_configs, validate_config
from ernie_platform.serving.auth import ApiKeyConfigError, reject_key_overrides

# The schemas must be in the ConfigStore before @hydra.main composes `conf/config.yaml`.
register_configs()


@hydra.main(config_path="../../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    validate_config(cfg)
    from ernie_platform.runtime import RayConnectionError
    from ernie_platform.serving import run_server

    try:
        run_server(cfg)
    except RayConnectionError as exc:
        # The message says what to fix: exit with it alone (Hydra would wrap the exception in a traceback).
        print(f"[serve] {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _refuse_key_on_command_line(argv: list[str]) -> None:
    """Exit 2 with the reason (never the value) when an override sets the API key, before Hydra writes anything."""
    try:
        reject_key_overrides(argv)
    except ApiKeyConfigError as e:
        print(f"[serve] error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    _refuse_key_on_command_line(sys.argv[1:])
    main()
