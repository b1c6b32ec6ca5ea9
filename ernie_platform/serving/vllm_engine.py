"""The vLLM engine backend (`serve.engine.backend=vllm`): vLLM's `AsyncLLM` inside the platform's Engine replica.

The ingress, the OpenAI layer, the request routers and the config stay the platform's; only the engine changes, as
Ray Serve LLM runs vLLM engines inside Serve deployments. The replica speaks the same protocol as the native
`EngineServer` (`ernie_platform.serving.engines.EngineReplica`): token prompts in (the ingress tokenizes and renders
chat templates, so both backends see the same ids), lists of `Tok` out, routing stats for the load-aware router.

Mapping to vLLM, per request:

* `SamplingParams` → vLLM's: temperature (0 = greedy), top_p, top_k, seed, stop strings (not included in the text,
  as in the native engine), n, ignore_eos, logprobs (the chosen token's and the top-k of the raw model
  distribution: vLLM's default `logprobs_mode=raw_logprobs` matches the native engine's); outputs as deltas.
* Each vLLM delta becomes one `Tok` per new token. vLLM detokenizes a delta as a whole, so its text goes on the
  delta's last token, except around ERNIE's `</think>` (a special token that the reasoning splitter finds by id):
  there the text is cut at that token, so reasoning and content split where the native engine splits them.
* Routing stats: running and waiting requests and KV usage from vLLM's scheduler stats (a custom stat logger, no
  periodic log lines), plus the prompt tokens of requests sent here that vLLM has not scheduled yet.

Environment (vLLM reads it when the engine is built, in this replica's process): `VLLM_CPU_KVCACHE_SPACE` from
`serve.engine.vllm.kv_cache_gib` on CPU (vLLM-CPU otherwise sizes its cache from the machine's memory), and
`VLLM_CPU_OMP_THREADS_BIND` from `serve.engine.vllm.omp_threads_bind` (vLLM pins its OpenMP threads to cores by
default; `nobind` leaves placement to the OS, which several replicas on one small machine need).

Only the `colocated` role exists for now: prefill/decode disaggregation with vLLM needs a KV connector that moves
the prompt's KV between engines (issue #17), so `serve.mode=pd` with this backend is refused in the driver.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any, AsyncIterator, Optional

from ernie_platform.inference import SamplingParams
from ernie_platform.inference.detokenize import token_text
from ernie_platform.serving.engines import STREAM_END, coalesced, replica_identity
from ernie_platform.serving.responses import Tok

log = logging.getLogger(__name__)


def vllm_environment(vcfg: dict[str, Any], device: str) -> dict[str, str]:
    """Environment variables vLLM reads at engine start, from `serve.engine.vllm` (already set ones are kept)."""
    env: dict[str, str] = {}
    if device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(int(vcfg.get("kv_cache_gib") or 1))
        if vcfg.get("omp_threads_bind"):
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(vcfg["omp_threads_bind"])
    return env


def checkpoint_dtype(model_path: str) -> str:
    """The dtype a checkpoint's config.json names (`dtype`, or transformers 4's `torch_dtype`), else float32."""
    import json
    from pathlib import Path

    d = json.loads((Path(model_path) / "config.json").read_text())
    name = d.get("dtype") or d.get("torch_dtype") or (d.get("text_config") or {}).get("dtype") or "float32"
    return str(name).removeprefix("torch.")


def engine_args(model_path: str, engine_cfg: dict[str, Any]) -> dict[str, Any]:
    """`vllm.AsyncEngineArgs` keyword arguments from `serve.engine` (`serve.engine.vllm.engine_args` last, so any vLLM
    engine argument can be set)."""
    vcfg = engine_cfg.get("vllm") or {}
    args: dict[str, Any] = {
        "model": model_path,
        "tokenizer": model_path,
        # None: the checkpoint's dtype, as the native engine (vLLM's "auto" would downcast fp32 to bf16)
        "dtype": engine_cfg.get("dtype") or checkpoint_dtype(model_path),
        "max_model_len": int(engine_cfg["max_seq_len"]),
        "max_num_seqs": int(engine_cfg["max_batch_size"]),
        "enforce_eager": bool(vcfg.get("enforce_eager", False)),
        "disable_log_stats": True,  # the stat logger below still receives the scheduler stats
        "seed": 0,
    }
    if engine_cfg.get("device", "cpu") != "cpu":
        args["gpu_memory_utilization"] = float(vcfg.get("gpu_memory_utilization") or 0.9)
    args.update(dict(vcfg.get("engine_args") or {}))
    return args


def vllm_sampling(params: SamplingParams) -> Any:
    """vLLM `SamplingParams` for the native ones (streamed as deltas)."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VSamplingParams(
        n=params.n,
        temperature=float(params.temperature),
        top_p=float(params.top_p),
        top_k=int(params.top_k) if params.top_k > 0 else -1,
        seed=params.seed,
        stop=list(params.stop) or None,
        max_tokens=int(params.max_tokens),
        ignore_eos=bool(params.ignore_eos),
        logprobs=params.logprobs,
        output_kind=RequestOutputKind.DELTA,
        **params.extra,  # the fields only vLLM implements (protocol.vllm_fields), range-checked by the ingress
    )


def toks_of_delta(
    out: Any, k: Optional[int], think_end: Optional[int], decode: Any, text_of: Any, want_tokens: bool
) -> list[Tok]:
    """`Tok`s of one vLLM `CompletionOutput` delta (see the module docstring for where the text goes). `k`: the
    request's top logprobs (None: no logprobs; vLLM adds the chosen token to its top k when it ranks below them).
    `text_of(token_id)`: a token's text for logprobs, the native engine's rule (`Engine.token_text`)."""
    ids = list(out.token_ids)
    if not ids:
        return []
    texts = [""] * len(ids)
    texts[-1] = out.text
    j = ids.index(think_end) if think_end in ids else 0
    if 0 < j < len(ids) - 1:  # the tag first or last in the delta: its text already splits there
        before = decode(ids[:j])
        if out.text.startswith(before):
            texts[j - 1] = before
            texts[-1] = out.text[len(before) :]
    lps = out.logprobs if k is not None else None
    toks = []
    for i, tid in enumerate(ids):
        logprob = top = token = None
        if lps is not None and i < len(lps) and lps[i]:
            entry = lps[i]
            chosen = entry.get(tid)
            if chosen is not None:
                logprob, token = float(chosen.logprob), text_of(tid)
            ranked = sorted((kv for kv in entry.items() if kv[1].rank is not None and 1 <= kv[1].rank <= k),
                            key=lambda kv: kv[1].rank)  # fmt: skip
            top = {text_of(t): float(v.logprob) for t, v in ranked}
        last = i == len(ids) - 1
        toks.append(Tok(out.index, int(tid), texts[i], logprob, top, out.finish_reason if last else None,
                        token if want_tokens else None))  # fmt: skip
    return toks


class _SchedulerSnapshot:
    """The latest vLLM scheduler stats, written by the stat logger on the engine's output loop."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0


def _stat_logger(snapshot: _SchedulerSnapshot) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SnapshotLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0):
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:  # fmt: skip
            if scheduler_stats is not None:
                snapshot.running = int(scheduler_stats.num_running_reqs)
                snapshot.waiting = int(scheduler_stats.num_waiting_reqs)
                snapshot.kv_usage = float(scheduler_stats.kv_cache_usage)

        def log_engine_initialized(self) -> None:
            pass

    return SnapshotLogger


class VLLMEngineServer:
    """Serve deployment class for `serve.engine.backend=vllm` (wrapped by `serve.deployment` in
    `ernie_platform.serving.app`). Same methods as the native `EngineServer` for the colocated role."""

    def __init__(self, role: str, model_path: Optional[str], engine_cfg: dict[str, Any]):
        if role != "colocated":
            raise ValueError(f"serve.engine.backend=vllm serves serve.mode=colocated only (got role {role!r})")
        if not model_path:
            raise ValueError("serve.engine.backend=vllm needs a checkpoint (model.path): vLLM cannot build the "
                             "demo model's random weights")  # fmt: skip
        vcfg = engine_cfg.get("vllm") or {}
        for key, value in vllm_environment(vcfg, engine_cfg.get("device", "cpu")).items():
            os.environ.setdefault(key, value)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.role = role
        self.snapshot = _SchedulerSnapshot()
        t0 = time.perf_counter()
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(model_path, engine_cfg)),
                                             stat_loggers=[_stat_logger(self.snapshot)])  # fmt: skip
        self.start_s = time.perf_counter() - t0
        cache = self.llm.vllm_config.cache_config
        self.max_batch_size = int(engine_cfg["max_batch_size"])
        blocks = int(cache.num_gpu_blocks or 0)  # 0 before vLLM sized its cache: fall back to the rows x context
        self.kv_budget_tokens = blocks * int(cache.block_size) or self.max_batch_size * int(engine_cfg["max_seq_len"])
        self.tokenizer = self.llm.renderer.tokenizer
        think = self.tokenizer.convert_tokens_to_ids("</think>") if self.tokenizer is not None else None
        unk = getattr(self.tokenizer, "unk_token_id", None)
        self.think_end = think if isinstance(think, int) and think != unk else None
        self.replica, self.deployment, _ = replica_identity(role)
        self._closed = threading.Event()
        self._arriving: dict[str, tuple[int, int, int]] = {}  # request id -> (seqs, KV tokens, prompt tokens)
        self._counters = {"requests_finished": 0, "tokens_generated": 0}
        self._texts: dict[int, str] = {}  # token id -> its text for logprobs
        self._active = 0  # generate streams in flight here
        self.stream_interval_s = float(engine_cfg.get("stream_interval_ms") or 0.0) / 1000
        log.info("vLLM %s replica %s ready in %.1f s (max_num_seqs=%d, max_model_len=%d, KV %d tokens)", role,
                 self.replica, self.start_s, self.max_batch_size, int(engine_cfg["max_seq_len"]),
                 self.kv_budget_tokens)  # fmt: skip

    def _token_text(self, token_id: int) -> str:
        if token_id not in self._texts:
            self._texts[token_id] = token_text(self.tokenizer, token_id)
        return self._texts[token_id]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _flush(self, last: Tok, ids: list[int], text: str) -> Tok:
        """At the end of a choice, the text vLLM's incremental detokenizer still holds back (the bytes of an
        incomplete UTF-8 character), as the native engine and transformers' `decode` give it (U+FFFD). Not after a
        stop string, whose text vLLM has cut on purpose."""
        full = self._decode(ids)
        if len(full) > len(text) and full.startswith(text):
            return last._replace(text=last.text + full[len(text) :])
        return last

    async def generate(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        want_tokens: bool = False,
        mm: Any = None,
    ) -> AsyncIterator[list[Tok]]:
        if not isinstance(prompt, list):
            raise ValueError("the vLLM backend takes token prompts only (serve.mode=colocated)")
        if mm is not None:
            raise ValueError("the vLLM backend does not serve images yet (docs/serving.md)")
        params.validate(allow_extra=True)
        sp = vllm_sampling(params)
        self._arriving[request_id] = (params.n, params.n * (len(prompt) + params.max_tokens), len(prompt))
        so_far: dict[int, tuple[list[int], list[str]]] = {}  # choice -> (token ids, text pieces) sent
        q: asyncio.Queue = asyncio.Queue()
        self._active += 1

        async def pump() -> None:
            try:
                async for out in self.llm.generate({"prompt_token_ids": prompt}, sp, request_id):
                    self._arriving.pop(request_id, None)  # scheduled: vLLM's stats count it from here
                    q.put_nowait(out)
                q.put_nowait(STREAM_END)
            except BaseException as e:  # noqa: B036 - handed to the consumer, which re-raises it
                q.put_nowait(e)

        task = asyncio.create_task(pump())
        try:
            async for items in coalesced(q, self.stream_interval_s, lambda: self._active > 1):
                toks: list[Tok] = []
                end = False
                for out in items:
                    if out is STREAM_END:
                        end = True
                        break
                    if isinstance(out, BaseException):
                        raise out
                    for o in out.outputs:
                        new = toks_of_delta(o, params.logprobs, self.think_end, self._decode, self._token_text,
                                            want_tokens)  # fmt: skip
                        ids, texts = so_far.setdefault(o.index, ([], []))
                        ids += [t.token_id for t in new]
                        texts += [t.text for t in new]
                        if new and o.finish_reason is not None and not isinstance(o.stop_reason, str):
                            new[-1] = self._flush(new[-1], ids, "".join(texts))
                        toks += new
                if toks:
                    self._counters["tokens_generated"] += len(toks)
                    yield toks
                if end:
                    self._counters["requests_finished"] += 1
                    return
        finally:
            # The consumer stopped (finished, client gone, replica shutting down): cancelling the pump closes vLLM's
            # generate, which aborts the request if it is still running.
            self._active -= 1
            self._arriving.pop(request_id, None)
            if not task.done():
                task.cancel()

    def _stats(self) -> dict[str, float]:
        arriving = list(self._arriving.values())
        s = self.snapshot
        return {
            "waiting": float(s.waiting + len(arriving)),
            "waiting_seqs": float(s.waiting + sum(a[0] for a in arriving)),
            "waiting_prompt_tokens": float(sum(a[2] for a in arriving)),
            "waiting_kv_tokens": float(sum(a[1] for a in arriving)),
            "running": float(s.running),
            "running_seqs": float(s.running),
            "kv_usage": float(s.kv_usage),
            "kv_used_tokens": float(s.kv_usage * self.kv_budget_tokens),
            "kv_budget_tokens": float(self.kv_budget_tokens),
            **{k: float(v) for k, v in self._counters.items()},
        }

    async def stats(self) -> dict[str, Any]:
        return {**self._stats(), "backend": "vllm", "deployment": self.deployment, "replica": self.replica,
                "role": self.role}  # fmt: skip

    async def record_routing_stats(self) -> dict[str, Any]:
        """This replica's load for the request routers, as the native `EngineServer.record_routing_stats`."""
        s = self._stats()
        return {
            "queued_prompt_tokens": s["waiting_prompt_tokens"],
            "running_seqs": s["running_seqs"],
            "waiting_seqs": s["waiting_seqs"],
            "kv_usage": s["kv_usage"],
            "waiting_kv_tokens": s["waiting_kv_tokens"],
            "kv_budget_tokens": s["kv_budget_tokens"],
            "max_seqs": float(self.max_batch_size),
            "timestamp": time.time(),
        }

    async def actor_name(self) -> str:
        import ray

        return ray.get_runtime_context().get_actor_name() or ""

    def check_health(self) -> None:
        if self._closed.is_set():
            raise RuntimeError("engine replica is shutting down")
        if self.llm.errored:
            raise RuntimeError("vLLM engine core died")

    def __del__(self) -> None:
        closed = getattr(self, "_closed", None)
        if closed is not None:
            closed.set()
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.shutdown()
            except Exception:  # interpreter shutdown: the engine core process dies with its parent anyway
                pass

