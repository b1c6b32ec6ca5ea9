"""Build the Ray Serve application from the composed config, and run it (`python -m workloads.serve`).

`build_application(cfg)` resolves the config in the driver (plain containers, absolute paths, the model to serve,
its name and limits) and binds the deployment graph:

    pd:         Ingress(cfg, Prefill, Decode)      Prefill = EngineServer("prefill"), Decode = EngineServer("decode")
    colocated:  Ingress(cfg, None, Engine)         Engine = EngineServer("colocated")

`run_server(cfg)` connects to Ray (`ernie_platform.runtime.connect_ray`: RAY_ADDRESS, a running local cluster,
or a new local instance; RAY_ADDRESS=local forces a new one; an address that does not answer raises
`RayConnectionError`, which `python -m workloads.serve` prints as one line), starts Serve's HTTP proxy on
serve.host:serve.port, deploys the app and blocks until SIGINT/SIGTERM, then
deletes the app (and shuts Serve and Ray down when it started them).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import threading
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import DictConfig, OmegaConf

from ernie_platform.configs.schema import ServeConfig
from ernie_platform.models.config import TEXT_MODEL_TYPES, VL_MODEL_TYPES
from ernie_platform.serving.auth import resolve_api_key
from ernie_platform.serving.engines import BACKENDS, backend_problem, engine_class

log = logging.getLogger(__name__)

SERVABLE_MODEL_TYPES = TEXT_MODEL_TYPES + VL_MODEL_TYPES
DEMO_MODEL_NAME = "ernie45-demo"


def latest_export(storage_path: str) -> Optional[Path]:
    """Newest `<storage_path>/*/export` with a servable model's config.json (text or VL)."""
    if "://" in storage_path and not storage_path.startswith("file://"):
        return None
    root = Path(storage_path.removeprefix("file://")).expanduser()
    found = []
    for cfg in root.glob("*/export/config.json"):
        try:
            model_type = json.loads(cfg.read_text()).get("model_type")
        except (OSError, ValueError):
            continue
        if model_type in SERVABLE_MODEL_TYPES:
            found.append((cfg.stat().st_mtime, cfg.parent))
        else:
            log.info("serve: skipping %s (model_type %s cannot be served)", cfg.parent, model_type)
    return max(found)[1] if found else None


def model_name_for(path: Optional[str]) -> str:
    """`<run>` for `.../<run>/export`, else the checkpoint directory's name; the demo model's name without a path."""
    if not path:
        return DEMO_MODEL_NAME
    p = Path(path)
    return p.parent.name if p.name == "export" and p.parent.name else p.name


def model_limits(path: Optional[str]) -> dict[str, Any]:
    """vocab_size and max_position_embeddings of the model to serve; for a VL model also `vision`: what the ingress
    needs to turn images into model inputs (patch and merge sizes, the checkpoint's image processor settings)."""
    from ernie_platform.inference.loading import demo_model_args
    from ernie_platform.models.config import ErnieModelArgs

    if path is None:
        args = demo_model_args()
        return {"vocab_size": int(args.vocab_size), "max_position_embeddings": int(args.max_position_embeddings)}
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"model.path={path}: no config.json (expected a transformers-layout checkpoint)")
    d = json.loads(cfg_file.read_text())
    model_type = d.get("model_type")
    if model_type in VL_MODEL_TYPES:
        from ernie_platform.models.vl.model import ErnieVLConfig

        vl = ErnieVLConfig.from_hf_dict(d)
        proc = Path(path) / "preprocessor_config.json"
        return {
            "vocab_size": int(vl.text.vocab_size),
            # not a field of the text model's arguments (M-RoPE has no table); the published configs give it
            "max_position_embeddings": int(
                (d.get("text_config") or {}).get("max_position_embeddings")
                or d.get("max_position_embeddings")
                or 131072
            ),
            "vision": {
                "patch_size": int(vl.vision.patch_size),
                "merge_size": int(vl.vision.spatial_merge_size),
                "processor": json.loads(proc.read_text()) if proc.is_file() else None,
            },
        }
    if model_type not in TEXT_MODEL_TYPES:
        raise ValueError(
            f"model.path={path}: model_type {model_type!r} cannot be served (one of {SERVABLE_MODEL_TYPES})"
        )
    args = ErnieModelArgs.from_hf_dict(d, source=str(cfg_file))
    return {"vocab_size": int(args.vocab_size), "max_position_embeddings": int(args.max_position_embeddings)}


def validate_serve(s: dict[str, Any]) -> None:
    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"config: serve.{key}={_get(s, key)!r} {why}")

    if s["mode"] not in ("pd", "colocated"):
        raise bad("mode", "is not valid (expected pd or colocated)")
    if not 0 <= int(s["port"]) < 65536:
        raise bad("port", "is not a TCP port")
    if not str(s["route_prefix"]).startswith("/"):
        raise bad("route_prefix", "must start with '/'")
    e = s["engine"]
    for key in ("max_batch_size", "max_seq_len", "torch_threads"):
        if int(e[key]) < 1:
            raise bad(f"engine.{key}", "must be >= 1")
    if e["max_seq_len"] < 2:
        raise bad("engine.max_seq_len", "must be >= 2")
    if not 1 <= int(s["max_n"]) <= int(e["max_batch_size"]):
        raise bad("max_n", f"must be in [1, engine.max_batch_size={e['max_batch_size']}]")
    for key in ("disagg_min_prompt_tokens", "default_max_tokens"):
        if int(s[key]) < 1:
            raise bad(key, "must be >= 1")
    if int(s["retries"]) < 0:
        raise bad("retries", "must be >= 0")
    if s.get("router", "load") not in ROUTERS:
        raise bad("router", f"is not valid (expected {' or '.join(ROUTERS)})")
    period = s.get("routing_stats_period_s", 1.0)
    if isinstance(period, bool) or not isinstance(period, (int, float)) or not 0 < period <= 600:
        raise bad("routing_stats_period_s", "must be a number of seconds in (0, 600]")
    if int(s.get("max_request_bytes", 1)) < 1024:
        raise bad("max_request_bytes", "must be >= 1024")
    if int(s.get("max_concurrent_tokenizations", 1)) < 1:
        raise bad("max_concurrent_tokenizations", "must be >= 1")
    if e["dtype"] not in (None, "float32", "bfloat16", "float16"):
        raise bad("engine.dtype", "is not valid (null, float32, bfloat16 or float16)")
    interval = e.get("stream_interval_ms", 0)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval <= 1000:
        raise bad("engine.stream_interval_ms", "must be a number of milliseconds in [0, 1000]")
    if e.get("backend", "native") not in BACKENDS:
        raise bad("engine.backend", f"is not valid (expected {' or '.join(BACKENDS)})")
    if e.get("backend") == "vllm":
        v = e.get("vllm") or {}
        if int(v.get("kv_cache_gib") or 0) < 1:
            raise bad("engine.vllm.kv_cache_gib", "must be >= 1 (GiB of KV cache per replica)")
        if not 0 < float(v.get("gpu_memory_utilization", 0.9)) <= 1:
            raise bad("engine.vllm.gpu_memory_utilization", "must be in (0, 1]")
    for name in ("ingress", "prefill", "decode", "colocated"):
        d = s[name]
        if int(d["num_replicas"]) < 1 and not d["autoscaling_config"]["enabled"]:
            raise bad(f"{name}.num_replicas", "must be >= 1 (or enable autoscaling_config)")
        a = d["autoscaling_config"]
        if a["enabled"] and not 0 <= a["min_replicas"] <= a["max_replicas"]:
            raise bad(f"{name}.autoscaling_config", "needs 0 <= min_replicas <= max_replicas")
        if int(d["max_ongoing_requests"]) < 1:
            raise bad(f"{name}.max_ongoing_requests", "must be >= 1")


# The schema's defaults, for configs given as plain dicts without these keys (one source: ServeConfig).
DEFAULT_MAX_REQUEST_BYTES = ServeConfig.max_request_bytes
DEFAULT_TOKENIZATIONS = ServeConfig.max_concurrent_tokenizations
ROUTERS = ("load", "pow2")
ROUTER_CLASSES = {  # serve.router=load: the request router of each engine deployment, by replica role
    "prefill": "ernie_platform.serving.router.PrefillLoadRouter",
    "decode": "ernie_platform.serving.router.DecodeLoadRouter",
    "colocated": "ernie_platform.serving.router.DecodeLoadRouter",
}


def request_router_settings(s: dict[str, Any], role: str) -> Optional[dict[str, Any]]:
    """`RequestRouterConfig` fields of an engine deployment for `serve.router` (None: Serve's default router).

    `load`: our load-aware router (ernie_platform.serving.router) reading the replicas' `record_routing_stats` every
    `serve.routing_stats_period_s`; a report older than 3 periods + 2 s counts as missing (the router then goes by
    its own requests in flight); the replica gets max(2 s, 5 periods) to answer a stats call."""
    if s.get("router", "load") != "load":
        return None
    period = float(s.get("routing_stats_period_s", 1.0))
    return {
        "request_router_class": ROUTER_CLASSES[role],
        "request_router_kwargs": {"role": role, "stale_after_s": 3 * period + 2.0},
        "request_routing_stats_period_s": period,
        "request_routing_stats_timeout_s": max(2.0, 5 * period),
    }


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


def resolve_serve_config(cfg: Union[DictConfig, dict[str, Any]]) -> dict[str, Any]:
    """Plain config with `model.path` absolute (or the newest local export, or None for the demo model) and the
    derived serving facts under `serve.resolved`."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else copy.deepcopy(dict(cfg))
    s = plain["serve"]
    # first: a key in the config is refused before anything could print or store it
    api_key = resolve_api_key(s)
    validate_serve(s)
    path = plain["model"].get("path")
    if path:
        path = str(Path(path).expanduser().resolve())
    else:
        found = latest_export(str(plain["run"]["storage_path"]))
        if found is not None:
            path = str(found.resolve())
            log.warning("serve: no model.path given, serving the newest local export %s", path)
    plain["model"]["path"] = path
    limits = model_limits(path)
    e = s["engine"]
    problem = backend_problem(e.get("backend", "native"), s["mode"], path, limits.get("vision") is not None,
                              e.get("device", "cpu"))  # fmt: skip
    if problem:
        raise ValueError(f"config: {problem}")
    max_seq_len = min(int(e["max_seq_len"]), limits["max_position_embeddings"])
    budget = e["kv_budget_tokens"] or int(e["max_batch_size"]) * max_seq_len
    replicas = {name: _replica_count(s[name]) for name in ("prefill", "decode", "colocated")}
    s["resolved"] = {
        "model_path": path,
        "model_name": s["model_name"] or model_name_for(path),
        "api_key": api_key,  # a `Secret` (repr masked) or None; never part of the composed config
        "max_seq_len": max_seq_len,
        "kv_budget_tokens": int(budget),
        "vocab_size": limits["vocab_size"],
        "vision": limits.get("vision"),
        "replicas": {
            "prefill": replicas["prefill"],
            "engine": replicas["decode"] if s["mode"] == "pd" else replicas["colocated"],
        },
    }
    return plain


def _replica_count(d: dict[str, Any]) -> int:
    a = d["autoscaling_config"]
    return max(1, min(int(a["max_replicas"]), 8)) if a["enabled"] else int(d["num_replicas"])


def deployment_options(d: dict[str, Any], name: str, graceful_s: float) -> dict[str, Any]:
    """Ray Serve `.options(...)` of one deployment from its `serve.<name>` node."""
    ao = d["ray_actor_options"]
    actor = {"num_cpus": float(ao["num_cpus"])}
    if ao.get("num_gpus"):
        actor["num_gpus"] = float(ao["num_gpus"])
    if ao.get("memory"):
        actor["memory"] = int(ao["memory"])
    if ao.get("resources"):
        actor["resources"] = dict(ao["resources"])
    opts: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": int(d["max_ongoing_requests"]),
        "ray_actor_options": actor,
        "graceful_shutdown_timeout_s": float(graceful_s),
        "graceful_shutdown_wait_loop_s": 0.5,
    }
    a = d["autoscaling_config"]
    if a["enabled"]:
        opts["autoscaling_config"] = {k: v for k, v in a.items() if k != "enabled" and v is not None}
    else:
        opts["num_replicas"] = int(d["num_replicas"])
    return opts


def build_application(cfg: Union[DictConfig, dict[str, Any]]) -> Any:
    """The bound Serve application (ingress deployment at the root of the graph)."""
    from ray import serve

    from ernie_platform.serving.ingress import Ingress

    plain = cfg if isinstance(cfg, dict) and "resolved" in cfg.get("serve", {}) else resolve_serve_config(cfg)
    s, r = plain["serve"], plain["serve"]["resolved"]
    engine_cfg = {**s["engine"], "max_seq_len": r["max_seq_len"], "kv_budget_tokens": r["kv_budget_tokens"],
                  "max_n": int(s["max_n"])}  # fmt: skip
    graceful = float(s["graceful_shutdown_timeout_s"])
    ingress_cfg = {
        "mode": s["mode"],
        "backend": s["engine"].get("backend", "native"),
        "model_name": r["model_name"],
        "model_path": r["model_path"],
        "api_key": r["api_key"],
        "max_seq_len": r["max_seq_len"],
        "kv_budget_tokens": r["kv_budget_tokens"],
        "vocab_size": r["vocab_size"],
        "is_vl": r.get("vision") is not None,
        "vision": r.get("vision"),
        "max_n": int(s["max_n"]),
        "default_max_tokens": int(s["default_max_tokens"]),
        "disagg_min_prompt_tokens": int(s["disagg_min_prompt_tokens"]),
        "retries": int(s["retries"]),
        "grpc_transport": bool(s["grpc_transport"]),
        "replicas": r["replicas"],
        "max_request_bytes": int(s.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES)),
        "max_concurrent_tokenizations": int(s.get("max_concurrent_tokenizations", DEFAULT_TOKENIZATIONS)),
        "metrics_require_key": bool(s.get("metrics_require_key", False)),
    }

    def dep(cls: Any, name: str, node: str, role: Optional[str] = None) -> Any:
        opts = deployment_options(s[node], name, graceful)
        router = request_router_settings(s, role) if role else None
        if router is not None:
            from ray.serve.config import RequestRouterConfig

            opts["request_router_config"] = RequestRouterConfig(**router)
        return serve.deployment(cls).options(**opts)

    path = r["model_path"]
    EngineServer = engine_class(s["engine"].get("backend", "native"))  # noqa: N806 - a class
    if s["mode"] == "pd":
        prefill = dep(EngineServer, "Prefill", "prefill", "prefill").bind("prefill", path, engine_cfg)
        engine = dep(EngineServer, "Decode", "decode", "decode").bind("decode", path, engine_cfg)
    else:
        engine = dep(EngineServer, "Engine", "colocated", "colocated").bind("colocated", path, engine_cfg)
        prefill = None
    return dep(Ingress, "Ingress", "ingress").bind(ingress_cfg, prefill, engine)


def cpus_needed(s: dict[str, Any]) -> int:
    names = ("ingress", "prefill", "decode") if s["mode"] == "pd" else ("ingress", "colocated")
    total = sum(float(s[n]["ray_actor_options"]["num_cpus"]) * _replica_count(s[n]) for n in names)
    return max(1, math.ceil(total))


def run_server(cfg: Union[DictConfig, dict[str, Any]]) -> None:
    """Serve until SIGINT/SIGTERM, then delete the app (and stop Serve and Ray if this process started them)."""
    import ray
    from ray import serve

    from ernie_platform.runtime import connect_ray

    plain = resolve_serve_config(cfg)
    s, r = plain["serve"], plain["serve"]["resolved"]
    started_ray = not ray.is_initialized()
    if s["grpc_transport"] and started_ray:
        # Read by the HTTP proxy of a Ray instance this process starts (inherited environment): proxy -> ingress
        # over gRPC too. A cluster we join keeps its own setting.
        os.environ.setdefault("RAY_SERVE_PROXY_USE_GRPC", "1")
    where = connect_ray(cpus_needed(s))  # RayConnectionError: the caller reports it (workloads/serve)
    local = where == "new local instance"
    name = r["model_name"]
    print(f"[serve] Ray: {where}; model {name} ({r['model_path'] or 'demo model, random weights'}); "
          f"mode {s['mode']}", flush=True)  # fmt: skip
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        print(f"[serve] {signal.Signals(signum).name}: shutting down", flush=True)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": s["host"], "port": int(s["port"])})
        serve.run(build_application(plain), name=s["app_name"], route_prefix=s["route_prefix"])
        base = f"http://{s['host']}:{s['port']}{s['route_prefix'].rstrip('/')}"
        print(
            f"[serve] ready: OpenAI API at {base}/v1 (model '{name}'"
            f"{', API key required' if r['api_key'] else ''}); metrics {base}/metrics; Ctrl-C to stop\n"
            f"  curl {base}/v1/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{name}", "prompt": "Hello", "max_tokens": 16}}\'',
            flush=True,
        )
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            serve.delete(s["app_name"])
            if local:
                serve.shutdown()
        finally:
            if started_ray and local:
                ray.shutdown()
        print("[serve] stopped", flush=True)
