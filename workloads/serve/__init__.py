"""`python -m workloads.serve` — the Ray Serve OpenAI-compatible app (docs/serving.md); `workloads.serve.app` holds
the importable application for `serve run` / `serve build` / KubeRay."""
