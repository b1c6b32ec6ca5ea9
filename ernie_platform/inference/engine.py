"""The inference engine: a FIFO queue, a KV slot pool with a token budget, and a step loop that admits and prefills
new requests (or imports their `PrefillResult`) and decodes every running sequence by one token.

Thread safety: `add_request`, `abort`, `has_work` and `stats` may be called from any thread while another runs
`step`; `prefill` may run concurrently with `step` (model forwards are serialised by a lock). `step` and
`generate_batch` return the events of every request, so drive one engine from one loop (`AsyncEngine`, or your own
calls to `generate_batch`), not both.
"""

from __future__ import annotations

import threading
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from ernie_platform.inference.detokenize import IncrementalDetokenizer, token_text
from ernie_platform.inference.kv import KVPool, check_kv, kv_to_cpu
from ernie_platform.inference.outputs import Completion, MMInputs, PrefillResult, TokenEvent, TokenLogprob
from ernie_platform.inference.sampling import Sample, Sampler, SamplingParams, sample_rows
from ernie_platform.models.cache import KVCache


@dataclass(eq=False)
class _Seq:
    req: _Request
    index: int
    sampler: Sampler
    detok: IncrementalDetokenizer
    row: int = -1
    output_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[TokenLogprob]] = None
    finish_reason: Optional[str] = None
    first: Optional[TokenEvent] = None  # imported from a PrefillResult, re-emitted on admission


@dataclass(eq=False)
class _Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    imported: Optional[PrefillResult] = None
    seqs: list[_Seq] = field(default_factory=list)
    mm: Optional[MMInputs] = None  # images of a VL prompt
    rope_delta: int = 0  # position offset after the prompt (VL prompts with images)

    @property
    def need_tokens(self) -> int:  # KV tokens reserved per choice
        return len(self.prompt_ids) + self.params.max_tokens


END_OF_TURN_TOKENS = ("<|end_of_sentence|>",)  # ERNIE 4.5's chat template closes every assistant turn with it


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """Ids of the chat template's end-of-turn tokens that this tokenizer has as special tokens: a chat answer ends
    there even when the tokenizer's `eos_token` is another token (`</s>` in ERNIE 4.5's vocabulary)."""
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    ids = set()
    for tok in END_OF_TURN_TOKENS:
        if tok in special:
            ids.add(int(tokenizer.convert_tokens_to_ids(tok)))
    return ids


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        max_batch_size: int = 16,
        max_seq_len: int = 1024,
        kv_budget_tokens: Optional[int] = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len} must be >= 2")
        budget = max_batch_size * max_seq_len if kv_budget_tokens is None else kv_budget_tokens
        if budget < 2:
            raise ValueError(f"kv_budget_tokens={kv_budget_tokens} must be >= 2")
        from ernie_platform.models.vl.model import ErnieVLForConditionalGeneration

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        # A VL model serves text prompts like a text model, and prompts with images (`MMInputs`) one by one.
        self.is_vl = isinstance(model, ErnieVLForConditionalGeneration)
        # Per KV row: position offset of the tokens after its prompt (VL prompts with images; 0 otherwise).
        self._row_delta = torch.zeros(max_batch_size, dtype=torch.long)
        self.vocab_size = int(model.args.vocab_size)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.pool = KVPool(model, max_batch_size, max_seq_len, budget)
        eos = {int(tokenizer.eos_token_id)} if getattr(tokenizer, "eos_token_id", None) is not None else set()
        cfg_eos = getattr(model.args, "eos_token_id", None)
        eos |= {int(cfg_eos)} if isinstance(cfg_eos, int) else {int(e) for e in (cfg_eos or [])}
        eos |= end_of_turn_ids(tokenizer)
        self.eos_token_ids: set[int] = eos
        self._lock = threading.Lock()  # queue / request bookkeeping
        self._step_lock = threading.Lock()  # one step at a time
        self._model_lock = threading.Lock()  # model forwards (step and prefill from other threads)
        self._waiting: deque[_Request] = deque()
        self._running: dict[str, _Request] = {}
        self._aborts: set[str] = set()
        self._collect: dict[str, list[Completion]] = {}  # finished completions kept for generate_batch
        self._token_text: dict[int, str] = {}
        self._counters = {"prefills_local": 0, "prefills_imported": 0, "requests_finished": 0, "tokens_generated": 0}

    @classmethod
    def from_pretrained(cls, path: Optional[str], **kw: Any) -> Engine:
        """`path=None`: the demo MoE (random weights, fixed seed) + built-in tokenizer, with a warning. Extra
        keywords: `dtype`, `device` (model loading), the rest go to `Engine(...)`."""
        from ernie_platform.inference.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(path, dtype=kw.pop("dtype", None), device=kw.pop("device", "cpu"))
        return cls(model, tokenizer, **kw)

    # ---- requests ------------------------------------------------------------------------------------------------
    def _check(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, mm: Optional[MMInputs] = None
    ) -> list[int]:
        params.validate()
        ids = list(prompt_ids)
        if not ids:
            raise ValueError(f"request {request_id}: empty prompt")
        if mm is not None:
            if not self.is_vl:
                raise ValueError(f"request {request_id}: image inputs, but the served model is a text-only model")
            for name in ("mm_token_type_ids", "moe_mm_token_type_ids"):
                got = len(getattr(mm, name))
                if got != len(ids):
                    raise ValueError(f"request {request_id}: {name} has {got} entries for {len(ids)} prompt tokens")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"request {request_id}: prompt token ids {bad[:5]} outside [0, {self.vocab_size})")
        need = len(ids) + params.max_tokens
        if need > self.max_seq_len:
            raise ValueError(
                f"request {request_id}: prompt of {len(ids)} tokens + max_tokens={params.max_tokens} = {need} "
                f"exceeds max_seq_len={self.max_seq_len}"
            )
        if params.n > self.max_batch_size:
            raise ValueError(f"request {request_id}: n={params.n} exceeds max_batch_size={self.max_batch_size}")
        if params.n * need > self.pool.budget_tokens:
            raise ValueError(
                f"request {request_id}: needs n={params.n} x {need} = {params.n * need} KV tokens (prompt "
                f"{len(ids)} + max_tokens {params.max_tokens}), more than kv_budget_tokens={self.pool.budget_tokens}"
            )
        return ids

    def _new_seqs(self, req: _Request) -> None:
        p = req.params
        req.seqs = [
            _Seq(req, i, Sampler(p, None if p.seed is None else p.seed + i), IncrementalDetokenizer(p.stop))
            for i in range(p.n)
        ]
        for s in req.seqs:
            s.logprobs = [] if p.logprobs is not None else None

    def add_request(
        self,
        request_id: str,
        prompt: Union[list[int], PrefillResult],
        params: SamplingParams,
        mm: Optional[MMInputs] = None,
    ) -> None:
        """Queue a request (FIFO). ValueError if it can never fit (max_seq_len, budget, n) or the id is in use.
        `mm`: the images of a VL prompt (a `PrefillResult` carries what its prompt's images left: the KV and the
        position offset)."""
        req = _Request(request_id, [], params)
        if isinstance(prompt, PrefillResult):
            if mm is not None:
                raise ValueError(f"request {request_id}: images go to the prefill, not with its PrefillResult")
            req.rope_delta = int(prompt.rope_delta)
            req.prompt_ids = self._check(request_id, prompt.prompt_ids, params)
            if len(prompt.sampler_state) != params.n:
                raise ValueError(f"request {request_id}: n={params.n} but the PrefillResult has "
                                 f"{len(prompt.sampler_state)} choices")  # fmt: skip
            check_kv(prompt.kv, self.pool.cache, len(req.prompt_ids))
            req.imported = prompt
            req.seqs = [self._import_seq(req, i, st) for i, st in enumerate(prompt.sampler_state)]
        else:
            req.prompt_ids = self._check(request_id, prompt, params, mm)
            req.mm = mm
            self._new_seqs(req)
        with self._lock:
            if request_id in self._running or any(r.id == request_id for r in self._waiting):
                raise ValueError(f"request id {request_id!r} is already in use")
            self._waiting.append(req)

    def _import_seq(self, req: _Request, index: int, st: dict[str, Any]) -> _Seq:
        s = _Seq(req, index, Sampler.from_state(req.params, st), IncrementalDetokenizer.from_state(st["detok"]))
        s.output_ids = list(st["output_ids"])
        s.logprobs = None if st["logprobs"] is None else list(st["logprobs"])
        s.first = st["first"]
        s.finish_reason = s.first.finish_reason
        return s

    def abort(self, request_id: str) -> None:
        """Drop a request (waiting or running); unknown / finished ids are ignored."""
        with self._lock:
            before = len(self._waiting)
            self._waiting = deque(r for r in self._waiting if r.id != request_id)
            if len(self._waiting) == before and request_id in self._running:
                self._aborts.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running or self._aborts)

    def stats(self) -> dict[str, float]:
        with self._lock:
            used, budget = self.pool.used_tokens, self.pool.budget_tokens
            return {
                "waiting": float(len(self._waiting)),
                # queued requests, for load-aware routing (docs/balance.md): their sequences, the prompt tokens
                # still to prefill here (imported KV needs none) and the KV they will reserve when admitted
                "waiting_seqs": float(sum(r.params.n for r in self._waiting)),
                "waiting_prompt_tokens": float(sum(len(r.prompt_ids) for r in self._waiting if r.imported is None)),
                "waiting_kv_tokens": float(sum(r.params.n * r.need_tokens for r in self._waiting)),
                "running": float(len(self._running)),
                "running_seqs": float(sum(1 for r in self._running.values() for s in r.seqs if not s.finish_reason)),
                "kv_used_tokens": float(used),  # reserved: prompt + max_tokens per running sequence
                "kv_cached_tokens": float(self.pool.cached_tokens()),  # actually written
                "kv_budget_tokens": float(budget),
                "kv_usage": used / budget,
                "free_rows": float(self.pool.free_rows),
                **{k: float(v) for k, v in self._counters.items()},
            }

    # ---- prefill -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _prefill_forward(self, prompts: list[list[int]]) -> tuple[torch.Tensor, KVCache]:
        """Batched prefill of right-padded prompts into a fresh cache; returns last-token logits [N, V] and the cache.
        All but the last token go in one forward, the last tokens in a second (T=1), so only N logit rows are made."""
        n, pmax = len(prompts), max(len(p) for p in prompts)
        cache = KVCache.for_model(self.model, n, pmax)
        with self._model_lock:
            if pmax > 1:
                ids = torch.zeros(n, pmax - 1, dtype=torch.long)
                mask = torch.zeros(n, pmax - 1, dtype=torch.long)
                for i, p in enumerate(prompts):
                    ids[i, : len(p) - 1] = torch.tensor(p[:-1], dtype=torch.long)
                    mask[i, : len(p) - 1] = 1
                self.model(ids.to(self.device), attention_mask=mask.to(self.device), cache=cache, logits_to_keep=1)
            last = torch.tensor([[p[-1]] for p in prompts], dtype=torch.long, device=self.device)
            logits = self.model(last, cache=cache, logits_to_keep=1).logits[:, 0]
        return logits, cache

    @torch.no_grad()
    def _prefill_mm(self, prompt: list[int], mm: MMInputs) -> tuple[torch.Tensor, KVCache, int]:
        """Prefill of one prompt with images in one forward: logits [1, V], its cache, its position offset."""
        cache = KVCache.for_model(self.model, 1, len(prompt))
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        with self._model_lock:
            out = self.model(
                ids,
                attention_mask=torch.ones_like(ids),
                mm_token_type_ids=torch.tensor([mm.mm_token_type_ids], dtype=torch.long, device=self.device),
                moe_mm_token_type_ids=torch.tensor([mm.moe_mm_token_type_ids], dtype=torch.long, device=self.device),
                pixel_values=mm.pixel_values.to(self.device, next(self.model.parameters()).dtype),
                image_grid_thw=mm.image_grid_thw.to(self.device),
                cache=cache,
                logits_to_keep=1,
            )
        delta = getattr(cache, "rope_deltas_B", None)
        return out.logits[:, 0], cache, 0 if delta is None else int(delta[0])

    def _prefill_requests(self, reqs: list[_Request]) -> tuple[torch.Tensor, list[list], list[int]]:
        """Prefill `reqs`: text prompts batched, prompts with images one by one. Returns last-token logits [N, V], each
        request's prompt KV (per layer (k [H, P, Dh], v [H, P, Dh]), views into the prefill caches) and position
        offset."""
        text = [i for i, r in enumerate(reqs) if r.mm is None]
        logits: list[Optional[torch.Tensor]] = [None] * len(reqs)
        kvs: list[list] = [[] for _ in reqs]
        deltas = [0] * len(reqs)
        if text:
            out, cache = self._prefill_forward([reqs[i].prompt_ids for i in text])
            for j, i in enumerate(text):
                n = len(reqs[i].prompt_ids)
                logits[i] = out[j]
                kvs[i] = [(k[j, :, :n], v[j, :, :n]) for k, v in zip(cache.k_LBHSD, cache.v_LBHSD)]
        for i, req in enumerate(reqs):
            if req.mm is not None:
                out, cache, deltas[i] = self._prefill_mm(req.prompt_ids, req.mm)
                logits[i] = out[0]
                kvs[i] = [(k[0], v[0]) for k, v in zip(cache.k_LBHSD, cache.v_LBHSD)]
        return torch.stack(logits), kvs, deltas

    def prefill(self, prompt_ids: list[int], params: SamplingParams, mm: Optional[MMInputs] = None) -> PrefillResult:
        """Prompt KV + first token(s) for disaggregated serving; continue with `add_request(id, result, params)` on a
        decode engine (same model). Thread-safe."""
        return self.prefill_batch([prompt_ids], [params], [mm])[0]

    def prefill_batch(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        mms: Optional[list[Optional[MMInputs]]] = None,
    ) -> list[PrefillResult]:
        """`prefill` of several prompts in one batched forward (as admission does); ValueError if any is invalid."""
        reqs = []
        for prompt_ids, p, mm in zip(prompts, params, mms or [None] * len(prompts), strict=True):
            req = _Request("prefill", [], p, mm=mm)
            req.prompt_ids = self._check("prefill", prompt_ids, p, mm)
            self._new_seqs(req)
            reqs.append(req)
        logits, kvs, deltas = self._prefill_requests(reqs)
        rows = [i for i, r in enumerate(reqs) for _ in r.seqs]
        events = iter(self._sample_and_advance([s for r in reqs for s in r.seqs], logits[rows]))
        out = []
        for i, req in enumerate(reqs):
            kv = kv_to_cpu(kvs[i])
            evs = [next(events) for _ in req.seqs]
            states = [
                {"rng": s.sampler.state()["rng"], "detok": s.detok.state(), "first": ev,
                 "output_ids": list(s.output_ids), "logprobs": None if s.logprobs is None else list(s.logprobs)}
                for s, ev in zip(req.seqs, evs)
            ]  # fmt: skip
            out.append(PrefillResult(list(req.prompt_ids), evs[0], kv, states, req.params, deltas[i]))
        with self._lock:
            self._counters["prefills_local"] += len(reqs)
        return out

    # ---- the step loop -------------------------------------------------------------------------------------------
    def step(self) -> dict[str, list[TokenEvent]]:
        """Admit waiting requests that fit (prefill them or import their KV), decode all running sequences by one
        token; returns the new events per request id. Finished sequences free their row and budget."""
        with self._step_lock:
            events: dict[str, list[TokenEvent]] = defaultdict(list)
            with self._lock:
                for rid in self._aborts:
                    if rid in self._running:
                        self._finish_request(self._running.pop(rid), collect=False)
                self._aborts.clear()
                admitted: list[_Request] = []
                while self._waiting and self.pool.fits(self._waiting[0].params.n, self._waiting[0].need_tokens):
                    req = self._waiting.popleft()
                    for s, row in zip(req.seqs, self.pool.allocate(req.params.n, req.need_tokens)):
                        s.row = row
                    self._running[req.id] = req
                    admitted.append(req)
            self._admit(admitted, events)
            live = [s for r in list(self._running.values()) for s in r.seqs if s.finish_reason is None]
            if live:
                self._decode(live, events)
            with self._lock:
                for req in [r for r in self._running.values() if all(s.finish_reason for s in r.seqs)]:
                    self._finish_request(self._running.pop(req.id), collect=True)
                for rid in self._aborts:
                    events.pop(rid, None)
            return dict(events)

    def _admit(self, admitted: list[_Request], events: dict[str, list[TokenEvent]]) -> None:
        local = [r for r in admitted if r.imported is None]
        if local:
            logits, kvs, deltas = self._prefill_requests(local)
            seqs, rows = [], []
            for i, req in enumerate(local):
                req.rope_delta, req.mm = deltas[i], None  # the images are in the KV now
                for s in req.seqs:
                    self.pool.write(s.row, kvs[i])
                    self._row_delta[s.row] = req.rope_delta
                    seqs.append(s)
                    rows.append(i)
            for s, ev in zip(seqs, self._sample_and_advance(seqs, logits[rows])):
                events[s.req.id].append(ev)
            with self._lock:
                self._counters["prefills_local"] += len(local)
        for req in admitted:
            if req.imported is not None:
                for s in req.seqs:
                    self.pool.write(s.row, req.imported.kv)
                    self._row_delta[s.row] = req.rope_delta
                    events[req.id].append(s.first)
                req.imported = None  # drop the CPU copy of the KV
                with self._lock:
                    self._counters["prefills_imported"] += 1

    @torch.no_grad()
    def _decode(self, live: list[_Seq], events: dict[str, list[TokenEvent]]) -> None:
        view = self.pool.decode_view([s.row for s in live])
        if self.is_vl:  # the VL model adds each row's offset to its cache length for the 3D positions
            view.rope_deltas_B = self._row_delta[: view.batch_size].to(self.device)
        ids = torch.zeros(view.batch_size, 1, dtype=torch.long)
        mask = torch.zeros(view.batch_size, 1, dtype=torch.long)
        for s in live:
            ids[s.row, 0], mask[s.row, 0] = s.output_ids[-1], 1
        with self._model_lock:
            out = self.model(ids.to(self.device), attention_mask=mask.to(self.device), cache=view, logits_to_keep=1)
        logits = out.logits[:, 0][torch.tensor([s.row for s in live], device=self.device)]
        for s, ev in zip(live, self._sample_and_advance(live, logits)):
            events[s.req.id].append(ev)

    def _sample_and_advance(self, seqs: list[_Seq], logits_NV: torch.Tensor) -> list[TokenEvent]:
        samples = sample_rows([s.sampler for s in seqs], logits_NV)
        evs = [self._advance(s, smp) for s, smp in zip(seqs, samples)]
        with self._lock:
            self._counters["tokens_generated"] += len(evs)
        return evs

    def _advance(self, seq: _Seq, smp: Sample) -> TokenEvent:
        """Append one sampled token: detokenize, check EOS / stop strings / max_tokens, and make its event."""
        t, p, tok = smp.token_id, seq.req.params, self.tokenizer
        seq.output_ids.append(t)
        top = None
        if smp.logprob is not None:
            top = {}
            for tid, lp in smp.top or []:
                key = self.token_text(tid)
                top[key if key not in top else f"{key}#{tid}"] = lp
            seq.logprobs.append(TokenLogprob(t, self.token_text(t), smp.logprob, top))
        reason = None
        if t in self.eos_token_ids and not p.ignore_eos:
            text, reason = seq.detok.finish(tok), "stop"
        else:
            text = seq.detok.add(tok, t)
            if seq.detok.stopped:
                reason = "stop"
            elif len(seq.output_ids) >= p.max_tokens:
                text += seq.detok.finish(tok)
                reason = "stop" if seq.detok.stopped else "length"
        seq.finish_reason = reason
        return TokenEvent(t, text, smp.logprob, top, reason, seq.index)

    def token_text(self, token_id: int) -> str:
        """A token's text for logprobs: its decoded text, or its vocabulary string when that is not whole
        characters (a lone UTF-8 byte)."""
        if token_id not in self._token_text:
            self._token_text[token_id] = token_text(self.tokenizer, token_id)
        return self._token_text[token_id]

    def _finish_request(self, req: _Request, collect: bool) -> None:
        """Free the request's rows (caller holds `_lock`); keep completions asked for by `generate_batch`."""
        for s in req.seqs:
            if s.row >= 0:
                self.pool.release(s.row)
                s.row = -1
        if collect:
            self._counters["requests_finished"] += 1
            if req.id in self._collect:
                self._collect[req.id] = [
                    Completion(len(req.prompt_ids), s.output_ids, s.detok.text, s.finish_reason or "stop",
                               s.logprobs, s.index, req.id)
                    for s in req.seqs
                ]  # fmt: skip

    # ---- synchronous batch API (RL rollouts, offline) ------------------------------------------------------------
    def generate_batch(
        self,
        prompts: list[Union[list[int], PrefillResult]],
        params: Union[SamplingParams, list[SamplingParams]],
    ) -> list[Completion]:
        """Add every prompt, step until all are done; returns the completions in prompt order (a prompt with n > 1
        gives n consecutive completions, by index). Requests beyond the KV budget simply queue."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        tag = uuid.uuid4().hex[:12]
        ids = [f"batch-{tag}-{i}" for i in range(len(prompts))]
        with self._lock:
            self._collect.update({rid: [] for rid in ids})
        try:
            for rid, prompt, p in zip(ids, prompts, plist):
                self.add_request(rid, prompt, p)
            while any(not self._collect[rid] for rid in ids):
                if not self.has_work():
                    raise RuntimeError("generate_batch: the engine went idle with requests unfinished (aborted?)")
                self.step()
            return [c for rid in ids for c in self._collect[rid]]
        finally:
            with self._lock:
                for rid in ids:
                    self._collect.pop(rid, None)
            for rid in ids:
                self.abort(rid)
