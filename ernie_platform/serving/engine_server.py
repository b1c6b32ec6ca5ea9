"""The engine replica: one `Engine` (+ `AsyncEngine`) per Ray Serve replica, in one of three roles.

* `prefill`: `prefill(prompt_ids, params)` → `PrefillResult` (CPU tensors; Serve puts it in the object store and
  hands it to a decode replica as a call argument, so the ingress never touches the KV).
* `decode`: `generate(request_id, prompt_ids | PrefillResult | KVRef, params, want_tokens)` streams lists of `Tok`.
  A `PrefillResult` (or a `KVRef` to one in the object store) is imported without recomputation; a token prompt
  (short prompts) is prefilled here.
* `colocated`: the same `generate`, always with token prompts.

`generate` sends whatever tokens are ready as one list, so when the consumer is slower than the engine (many
streams on a busy machine) several tokens travel in one Serve stream item instead of one item per token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, AsyncIterator, Optional, Union

from ernie_platform.inference import AsyncEngine, Engine, MMInputs, PrefillResult, SamplingParams
from ernie_platform.serving.engines import STREAM_END, coalesced, replica_identity
from ernie_platform.serving.metrics import engine_gauges
from ernie_platform.serving.responses import KVRef, Tok

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
PREFILL_BATCH = 16  # prompts per batched prefill forward on a prefill replica
PREFILL_BATCH_TOKENS = 8192  # and at most about this many prompt tokens


def build_engine(model_path: Optional[str], engine_cfg: dict[str, Any], role: str) -> Engine:
    import torch

    dtype = engine_cfg.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"serve.engine.dtype={dtype!r} is not one of {DTYPES} (or null)")
    # A prefill replica never decodes: a pool of max_n rows is enough for `Engine.prefill`'s checks.
    rows = int(engine_cfg["max_n"]) if role == "prefill" else int(engine_cfg["max_batch_size"])
    budget = None if role == "prefill" else engine_cfg.get("kv_budget_tokens")
    return Engine.from_pretrained(
        model_path,
        max_batch_size=rows,
        max_seq_len=int(engine_cfg["max_seq_len"]),
        kv_budget_tokens=budget,
        dtype=None if dtype is None else getattr(torch, dtype),
        device=engine_cfg.get("device", "cpu"),
    )


class EngineServer:
    """Serve deployment class (wrapped by `serve.deployment` in `ernie_platform.serving.app`)."""

    def __init__(self, role: str, model_path: Optional[str], engine_cfg: dict[str, Any]):
        import torch

        # Tiny and mid-size models on CPU: intra-op threads only add contention (docs/inference.md).
        torch.set_num_threads(int(engine_cfg.get("torch_threads", 1)))
        self.role = role
        self.engine = build_engine(model_path, engine_cfg, role)
        self.aeng = AsyncEngine(self.engine)
        self.replica, self.deployment, in_serve = replica_identity(role)
        self._gauges = engine_gauges() if in_serve else None
        self._closed = threading.Event()
        self._pending: list[tuple[list[int], SamplingParams, asyncio.Future, Optional[MMInputs]]] = []
        self._batcher: Optional[asyncio.Task] = None
        self._prefilling_tokens = 0  # prompt tokens of the prefill forward running now (prefill role)
        self._active = 0  # generate streams in flight here
        self.stream_interval_s = float(engine_cfg.get("stream_interval_ms") or 0.0) / 1000
        # generate calls not in the engine's queue yet (a decode replica first fetches the prefill result): they
        # count as waiting in the routing stats, or a burst would look like an idle replica until it lands.
        self._arriving: dict[str, tuple[int, int, int]] = {}  # request id -> (seqs, KV tokens, prompt to prefill)
        if self._gauges:
            threading.Thread(target=self._publish_gauges, name="ernie-gauges", daemon=True).start()
        log.info("%s replica %s ready (max_batch_size=%d, max_seq_len=%d)", role, self.replica,
                 self.engine.max_batch_size, self.engine.max_seq_len)  # fmt: skip

    async def prefill(
        self, prompt_ids: list[int], params: SamplingParams, mm: Optional[MMInputs] = None
    ) -> PrefillResult:
        """Prompts that arrive while a prefill forward runs are prefilled together in the next one (one batched
        forward instead of one per prompt: what keeps a prefill replica ahead of bursts; prompts with images, `mm`,
        still take one forward each inside it)."""
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((prompt_ids, params, fut, mm))
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._prefill_batches())
        return await fut

    async def _prefill_batches(self) -> None:
        while self._pending:
            batch, tokens = [], 0
            while self._pending and len(batch) < PREFILL_BATCH and tokens < PREFILL_BATCH_TOKENS:
                item = self._pending.pop(0)
                if not item[2].done():  # its caller was cancelled
                    batch.append(item)
                    tokens += len(item[0]) * item[1].n
            if not batch:
                continue
            self._prefilling_tokens = sum(len(b[0]) for b in batch)
            try:
                results = await asyncio.to_thread(self.engine.prefill_batch, [b[0] for b in batch],
                                                  [b[1] for b in batch], [b[3] for b in batch])  # fmt: skip
            except ValueError:  # some prompt is invalid: one by one, so each caller gets its own answer
                results = None
            except Exception as e:
                self._prefilling_tokens = 0
                for _, _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for i, (ids, params, fut, mm) in enumerate(batch):
                if results is not None:
                    result: Any = results[i]
                else:
                    try:
                        result = await asyncio.to_thread(self.engine.prefill, ids, params, mm)
                    except Exception as e:
                        result = e
                if fut.done():
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
            self._prefilling_tokens = 0

    async def generate(
        self,
        request_id: str,
        prompt: Union[list[int], PrefillResult, KVRef],
        params: SamplingParams,
        want_tokens: bool = False,
        mm: Optional[MMInputs] = None,
    ) -> AsyncIterator[list[Tok]]:
        if isinstance(prompt, KVRef):
            self._arriving[request_id] = _cost(prompt.prompt_tokens, params, prefill=False)
            try:
                prompt = await prompt.ref  # straight from the prefill replica's object store
            finally:
                self._arriving.pop(request_id, None)
        q: asyncio.Queue = asyncio.Queue()
        if isinstance(prompt, list):  # until pump() puts it in the engine's queue
            self._arriving[request_id] = _cost(len(prompt), params, prefill=True)

        async def pump() -> None:
            try:
                # add_request runs in the generator's first step, with no await before it: the request moves from
                # `_arriving` to the engine's waiting queue atomically for `record_routing_stats`
                self._arriving.pop(request_id, None)
                async for ev in self.aeng.generate(request_id, prompt, params, mm):
                    q.put_nowait(ev)
                q.put_nowait(STREAM_END)
            except BaseException as e:  # noqa: B036 - handed to the consumer, which re-raises it
                q.put_nowait(e)

        task = asyncio.create_task(pump())
        self._active += 1
        try:
            async for items in coalesced(q, self.stream_interval_s, lambda: self._active > 1):
                out: list[Tok] = []
                end = False
                for it in items:
                    if it is STREAM_END:
                        end = True
                    elif isinstance(it, BaseException):
                        raise it
                    else:
                        out.append(Tok(it.index, it.token_id, it.text, it.logprob, it.top_logprobs, it.finish_reason,
                                       self.engine.token_text(it.token_id) if want_tokens else None))  # fmt: skip
                if out:
                    yield out
                if end:
                    return
        finally:
            self._active -= 1
            self._arriving.pop(request_id, None)
            if not task.done():
                task.cancel()  # closes the AsyncEngine stream, which aborts the request

    async def stats(self) -> dict[str, Any]:
        return {**self.aeng.stats(), "deployment": self.deployment, "replica": self.replica, "role": self.role}

    async def record_routing_stats(self) -> dict[str, Any]:
        """This replica's load for the request routers (`ernie_platform.serving.router`), called by Serve every
        `serve.routing_stats_period_s`; read as `ernie_platform.balance.routing.ReplicaLoad`. Runs on the replica's
        event loop, so `_pending` / `_arriving` are consistent with what `prefill` / `generate` did so far."""
        s = self.engine.stats()
        arriving = list(self._arriving.values())
        queued = s.get("waiting_prompt_tokens", 0.0) + sum(a[2] for a in arriving)
        queued += self._prefilling_tokens + sum(len(ids) for ids, _, fut, _ in self._pending if not fut.done())
        return {
            "queued_prompt_tokens": float(queued),
            "running_seqs": float(s["running_seqs"]),
            "waiting_seqs": float(s.get("waiting_seqs", s["waiting"]) + sum(a[0] for a in arriving)),
            "kv_usage": float(s["kv_usage"]),
            "waiting_kv_tokens": float(s.get("waiting_kv_tokens", 0.0) + sum(a[1] for a in arriving)),
            "kv_budget_tokens": float(s["kv_budget_tokens"]),
            "max_seqs": float(self.engine.max_batch_size),
            "timestamp": time.time(),
        }

    async def actor_name(self) -> str:
        import ray

        return ray.get_runtime_context().get_actor_name() or ""

    def check_health(self) -> None:
        if self._closed.is_set():
            raise RuntimeError("engine replica is shutting down")

    def _publish_gauges(self) -> None:
        while not self._closed.wait(2.0):
            try:
                stats = self.engine.stats()
                for k, g in self._gauges.items():
                    g.set(float(stats.get(k, 0.0)))
            except Exception:  # metrics must never take the replica down
                log.debug("engine gauge update failed", exc_info=True)

    def __del__(self) -> None:
        closed = getattr(self, "_closed", None)
        if closed is not None:
            closed.set()
        aeng = getattr(self, "aeng", None)
        if aeng is not None:
            aeng.shutdown()


def _cost(prompt_tokens: int, params: SamplingParams, prefill: bool) -> tuple[int, int, int]:
    """(sequences, KV tokens, prompt tokens to prefill here) of a request."""
    return params.n, params.n * (prompt_tokens + params.max_tokens), prompt_tokens if prefill else 0
