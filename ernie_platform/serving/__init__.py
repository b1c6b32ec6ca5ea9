"""Ray Serve app with an OpenAI-compatible API over the inference engine (docs/serving.md).

`build_application(cfg)` binds the deployment graph (ingress → prefill/decode, or one colocated engine);
`run_server(cfg)` is what `python -m workloads.serve` runs. Ray Serve is imported only by those two.
"""

from ernie_platform.serving.app import build_application, resolve_serve_config, run_server

__all__ = ["build_application", "resolve_serve_config", "run_server"]
