"""Importable Serve application for `serve run`, `serve build` and KubeRay's RayService.

    serve run workloads.serve.app:app                                  # the default config (conf/config.yaml)
    serve run workloads.serve.app:build_app model.path=/ckpt serve.mode=colocated
    serve build workloads.serve.app:app -o serve_config.yaml

`build_app(args)` takes the same overrides as `python -m workloads.serve` (flat dotted keys, or nested mappings as in
a Serve config file's `args:`), except an API key: that comes from `ERNIE_API_KEY` or `serve.api_key_file` in the
process that builds the app. `app` is built on first access (PEP 562), so importing this module is cheap.
Note that `serve run` / RayService own the HTTP options: `serve.host` / `serve.port` apply to
`python -m workloads.serve` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _overrides(args: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in args.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += _overrides(v, f"{key}.")
        elif v is None:
            out.append(f"{key}=null")
        elif isinstance(v, bool):
            out.append(f"{key}={str(v).lower()}")
        else:
            out.append(f"{key}={v}")
    return out


def compose_config(args: Mapping[str, Any] | None = None) -> Any:
    """`conf/config.yaml` composed with `args` as Hydra overrides, validated."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ernie_platform.configs import register_configs, validate_config
    from ernie_platform.serving.auth import reject_key_mapping

    register_configs()
    reject_key_mapping(args or {})  # a Serve config's `args:` is stored and shown: no key there (serving/auth.py)
    overrides = _overrides(args or {})
    if GlobalHydra.instance().is_initialized():  # inside @hydra.main or a caller's initialize(): reuse it
        cfg = compose(config_name="config", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    validate_config(cfg)
    return cfg


def build_app(args: Mapping[str, Any] | None = None) -> Any:
    """Serve application builder: `args` are config overrides, e.g. {"model.path": "/ckpt", "serve.mode": "pd"}."""
    from ernie_platform.serving import build_application

    return build_application(compose_config(args))


def __getattr__(name: str) -> Any:
    if name == "app":
        application = build_app({})
        globals()["app"] = application
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
