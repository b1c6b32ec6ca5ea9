"""Sampling parameters and the per-sequence sampler.

Order of operations on a row's fp32 logits: temperature → top-k → top-p → multinomial draw from the request's own
`torch.Generator` (CPU, seeded from `seed`), so a seeded request samples the same tokens whatever else is batched.
`temperature == 0` is greedy (argmax, no randomness consumed). Reported logprobs are `log_softmax` of the *raw*
logits (temperature 1, before top-k/top-p), i.e. the model's own distribution, as RL rollouts need.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: Optional[int] = None  # choice i of a request uses seed + i
    stop: list[str] = field(default_factory=list)  # the stop string is not included in the output text
    logprobs: Optional[int] = None  # None: none; k >= 0: chosen token's logprob + top-k alternatives
    ignore_eos: bool = False
    n: int = 1  # independent choices sampled from one prompt (one prefill, n cache rows)
    # Sampling fields only another engine implements (the vLLM backend: min_tokens, repetition_penalty, min_p,
    # presence/frequency penalties, logit_bias, stop_token_ids, allowed_token_ids), by vLLM's names. The serving
    # layer fills it only for that backend; this engine refuses a non-empty one rather than ignore it.
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, allow_extra: bool = False) -> None:
        """Raise ValueError naming the offending field and value (`extra` too unless the engine implements it)."""

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r} {why}")

        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature):
            raise bad("temperature", "must be a finite number")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 = off)")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", "must be None or an integer in [0, 2**63)")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings")
        if self.logprobs is not None and (not is_int(self.logprobs) or self.logprobs < 0):
            raise bad("logprobs", "must be None or an integer >= 0")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be a bool")
        if not is_int(self.n) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.extra and not allow_extra:
            raise ValueError(f"{', '.join(sorted(self.extra))}: not implemented by this engine "
                             "(serve.engine.backend=vllm implements them)")  # fmt: skip


@dataclass
class Sample:
    token_id: int
    logprob: Optional[float] = None
    top: Optional[list[tuple[int, float]]] = None  # (token id, logprob), best first


class Sampler:
    """One sequence's sampling state: its params and its random generator (picklable through `state()`)."""

    def __init__(self, params: SamplingParams, seed: Optional[int] = None):
        self.params = params
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(secrets.randbits(63) if seed is None else seed)

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0

    def state(self) -> dict[str, Any]:
        return {"rng": self.generator.get_state()}

    @classmethod
    def from_state(cls, params: SamplingParams, state: dict[str, Any]) -> Sampler:
        s = cls(params, seed=0)
        s.generator.set_state(state["rng"])
        return s

    def draw(self, logits_V: torch.Tensor) -> int:
        """One token from fp32 CPU logits [V] with temperature → top-k → top-p."""
        p = self.params
        if p.temperature == 0:
            return int(logits_V.argmax())
        logits = logits_V / p.temperature
        if 0 < p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = sorted_logits.softmax(-1)
            # drop a token when the mass of the tokens before it already reaches top_p (the first is always kept)
            drop = (probs.cumsum(-1) - probs) >= p.top_p
            logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def sample_rows(samplers: list[Sampler], logits_NV: torch.Tensor) -> list[Sample]:
    """Sample one token per row (row i with samplers[i]); greedy rows use one batched argmax on the logits' device."""
    logits_NV = logits_NV.float()
    out: list[Optional[Sample]] = [None] * len(samplers)
    greedy = [i for i, s in enumerate(samplers) if s.greedy]
    if greedy:
        ids = logits_NV[greedy].argmax(-1).tolist()
        for i, t in zip(greedy, ids):
            out[i] = Sample(t)
    rest = [i for i, s in enumerate(samplers) if not s.greedy]
    if rest:
        cpu = logits_NV[rest].cpu()
        for j, i in enumerate(rest):
            out[i] = Sample(samplers[i].draw(cpu[j]))
    want = [i for i, s in enumerate(samplers) if s.params.logprobs is not None]
    if want:
        logp_NV = torch.log_softmax(logits_NV[want], dim=-1)
        chosen = torch.tensor([out[i].token_id for i in want], device=logp_NV.device)
        chosen_lp = logp_NV.gather(1, chosen[:, None])[:, 0].tolist()
        k_max = min(max(samplers[i].params.logprobs for i in want), logp_NV.shape[-1])
        top_v, top_i = logp_NV.topk(k_max, dim=-1) if k_max else (logp_NV[:, :0], logp_NV[:, :0].long())
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for j, i in enumerate(want):
            k = samplers[i].params.logprobs
            out[i].logprob = chosen_lp[j]
            out[i].top = list(zip(top_i[j][:k], top_v[j][:k]))
    return out  # type: ignore[return-value]
