"""Request routing across serving replicas by load: load scores and power-of-two choices (Ray-free).

The Ray Serve request routers of `ernie_platform.serving.router` are thin wrappers around this module; everything
that decides where a request goes lives here, so it can be tested without Ray. See docs/balance.md, "Request routing".

* A replica reports its load (`ReplicaLoad`, built from the dict its `record_routing_stats` returns) every
  `serve.routing_stats_period_s`; Serve's controller forwards the dict to every router.
* Between two reports a router adds what it sent itself since the report was taken (`LocalLoadTracker`), so that
  all the requests of one report period do not pile onto the replica that looked lightest when the period began.
* Load scores (lower is better):

  - prefill replicas: ``prefill_score = queued_prompt_tokens + pending.prompt_tokens`` (prompt tokens waiting for
    a prefill forward or in the one running: what the next request waits behind);
  - decode / colocated replicas: the utilisation of the scarcer of their two resources, batch rows and KV budget,
    with the queued requests counted as if admitted::

        rows = (running_seqs + waiting_seqs + pending.seqs) / max_seqs
        kv   = kv_usage + (waiting_kv_tokens + pending.kv_tokens) / kv_budget_tokens
        decode_score = max(rows, kv) + TIE_WEIGHT * min(rows, kv)

    The engine admits a request only while both a row and its KV reservation are free, so the larger fraction is
    what limits the replica; the small `TIE_WEIGHT` term orders replicas whose bottleneck is equally full by the
    other resource. Both fractions may exceed 1 (a queue longer than the batch).

* `power_of_two_choices`: two distinct candidates drawn uniformly with an injectable `random.Random`, the one with
  the lower score first. Equal scores keep the draw order (the first drawn wins), which is deterministic for a given
  RNG and, the draw being uniform, favours no replica.
* A replica without a usable report (none yet, malformed, or older than `stale_after_s`) is scored from this
  router's own requests in flight to it alone, with the capacity (`max_seqs`, `kv_budget_tokens`) of a replica that
  did report (all replicas of a deployment share one config): a fresh replica starts empty, so it takes traffic at
  once, and each request sent to it raises its score.
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence, TypeVar

ROLES = ("prefill", "decode", "colocated")
TIE_WEIGHT = 0.01  # weight of the non-bottleneck resource in decode_score
T = TypeVar("T")


@dataclass(frozen=True)
class ReplicaLoad:
    """One load report of an engine replica (`EngineServer.record_routing_stats`)."""

    queued_prompt_tokens: float = 0.0  # prompt tokens waiting for a prefill forward or in the running one
    running_seqs: float = 0.0  # sequences being decoded
    waiting_seqs: float = 0.0  # sequences of queued requests (not admitted yet, or still arriving)
    kv_usage: float = 0.0  # KV reserved by running sequences / kv_budget_tokens
    waiting_kv_tokens: float = 0.0  # KV the queued requests will reserve when admitted
    kv_budget_tokens: float = 0.0  # 0: unknown
    max_seqs: float = 0.0  # batch rows; 0: unknown
    timestamp: float = 0.0  # time.time() on the replica when the report was taken

    FIELDS = ("queued_prompt_tokens", "running_seqs", "waiting_seqs", "kv_usage", "waiting_kv_tokens",
              "kv_budget_tokens", "max_seqs")  # fmt: skip

    @classmethod
    def from_stats(cls, stats: Optional[Mapping[str, Any]]) -> Optional[ReplicaLoad]:
        """The report in a routing-stats dict; None when there is none (`{}`: the replica has not reported yet) or
        it is malformed (missing timestamp, non-numeric, negative or non-finite values)."""
        if not stats or "timestamp" not in stats:
            return None
        try:
            values = {k: float(stats.get(k, 0.0)) for k in (*cls.FIELDS, "timestamp")}
        except (TypeError, ValueError):
            return None
        if any(not math.isfinite(v) or v < 0 for v in values.values()):
            return None
        return cls(**values)

    def to_stats(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in (*self.FIELDS, "timestamp")}


@dataclass(frozen=True)
class PendingLoad:
    """Work a router sent to a replica that the replica's last report does not include (or, without a report, all
    it has in flight there). Also the cost of one request."""

    prompt_tokens: float = 0.0  # tokens to prefill
    seqs: float = 0.0  # sequences (the request's n)
    kv_tokens: float = 0.0  # KV reservation: n x (prompt + max_tokens)
    requests: int = 0

    def __add__(self, other: PendingLoad) -> PendingLoad:
        return PendingLoad(self.prompt_tokens + other.prompt_tokens, self.seqs + other.seqs,
                           self.kv_tokens + other.kv_tokens, self.requests + other.requests)  # fmt: skip


NO_PENDING = PendingLoad()


def prefill_score(load: Optional[ReplicaLoad], pending: PendingLoad = NO_PENDING) -> float:
    """Prompt tokens queued on a prefill replica (reported + sent since the report)."""
    return (load.queued_prompt_tokens if load is not None else 0.0) + pending.prompt_tokens


def decode_score(
    load: Optional[ReplicaLoad],
    pending: PendingLoad = NO_PENDING,
    max_seqs: Optional[float] = None,
    kv_budget_tokens: Optional[float] = None,
) -> float:
    """max(rows, kv) + TIE_WEIGHT * min(rows, kv) (module docstring). Capacities come from the report, else the
    arguments (another replica's report), else 1 (then the score still orders replicas by sequences / KV tokens)."""
    if load is None:
        load = ReplicaLoad()
    rows_cap = load.max_seqs or max_seqs or 1.0
    kv_cap = load.kv_budget_tokens or kv_budget_tokens or 1.0
    rows = (load.running_seqs + load.waiting_seqs + pending.seqs) / rows_cap
    kv = load.kv_usage + (load.waiting_kv_tokens + pending.kv_tokens) / kv_cap
    return max(rows, kv) + TIE_WEIGHT * min(rows, kv)


def power_of_two_choices(candidates: Sequence[T], score: Callable[[T], float], rng: random.Random) -> list[T]:
    """Two distinct candidates drawn uniformly at random, the lower score first (ties: the first drawn first).
    One candidate: just it; none: []. Only the two drawn candidates are scored."""
    n = len(candidates)
    if n == 0:
        return []
    if n == 1:
        return [candidates[0]]
    i = rng.randrange(n)
    j = rng.randrange(n - 1)
    if j >= i:  # uniform over ordered pairs i != j
        j += 1
    a, b = candidates[i], candidates[j]
    return [b, a] if score(b) < score(a) else [a, b]


class LocalLoadTracker:
    """The requests one router has in flight, per replica: (time sent, cost), dropped when they complete.

    A completion may be seen before the send is recorded (a request that finishes while its router still awaits
    the replica's accept message): the last `RECENT_DONE` completed ids are remembered so that it is not recorded
    as in flight afterwards."""

    RECENT_DONE = 4096

    def __init__(self) -> None:
        self._inflight: dict[Hashable, dict[Hashable, tuple[float, PendingLoad]]] = {}
        self._done: OrderedDict[Hashable, None] = OrderedDict()

    def sent(self, replica: Hashable, request: Hashable, cost: PendingLoad, at: float) -> None:
        if request in self._done:  # rare: it may also be an attempt rejected before (then this one is not counted)
            del self._done[request]
            return
        self._inflight.setdefault(replica, {})[request] = (at, cost)

    def done(self, replica: Hashable, request: Hashable) -> None:
        reqs = self._inflight.get(replica)
        if reqs is not None and request in reqs:
            del reqs[request]
            if not reqs:
                del self._inflight[replica]
            return
        self._done[request] = None
        if len(self._done) > self.RECENT_DONE:
            self._done.popitem(last=False)

    def pending(self, replica: Hashable, since: Optional[float] = None) -> PendingLoad:
        """Cost of the requests in flight to `replica` sent after `since` (None: all of them)."""
        total = NO_PENDING
        for at, cost in self._inflight.get(replica, {}).values():
            if since is None or at > since:
                total = total + cost
        return total

    def retain(self, replicas: Sequence[Hashable]) -> None:
        """Forget replicas that are gone."""
        keep = set(replicas)
        for r in [r for r in self._inflight if r not in keep]:
            del self._inflight[r]

    def forget(self, replica: Hashable) -> None:
        self._inflight.pop(replica, None)


class LoadRouterPolicy:
    """The routing decision of one router for one deployment: `choose(candidates, stats_of)` ranks two sampled
    candidates by load score. `role` picks the score: `prefill` → `prefill_score`, `decode` / `colocated` →
    `decode_score`. Feed it the requests the router sends (`sent`) and sees complete (`done`)."""

    def __init__(
        self,
        role: str,
        stale_after_s: float = 5.0,
        rng: Optional[random.Random] = None,
        clock: Callable[[], float] = time.time,
    ):
        if role not in ROLES:
            raise ValueError(f"routing role {role!r} is not valid (expected one of {ROLES})")
        if not stale_after_s > 0:
            raise ValueError(f"stale_after_s={stale_after_s!r} must be > 0")
        self.role = role
        self.stale_after_s = float(stale_after_s)
        self.rng = rng if rng is not None else random.Random()
        self.clock = clock
        self.tracker = LocalLoadTracker()

    def fresh_load(self, stats: Optional[Mapping[str, Any]], now: Optional[float] = None) -> Optional[ReplicaLoad]:
        """The report in `stats` when there is a usable one, not older than `stale_after_s`."""
        load = ReplicaLoad.from_stats(stats)
        now = self.clock() if now is None else now
        if load is None or now - load.timestamp > self.stale_after_s:
            return None
        return load

    def score(
        self,
        replica: Hashable,
        stats: Optional[Mapping[str, Any]],
        capacity: tuple[Optional[float], Optional[float]] = (None, None),
        now: Optional[float] = None,
    ) -> float:
        load = self.fresh_load(stats, now)
        pending = self.tracker.pending(replica, since=None if load is None else load.timestamp)
        if self.role == "prefill":
            return prefill_score(load, pending)
        return decode_score(load, pending, *capacity)

    def choose(self, candidates: Sequence[T], stats_of: Callable[[T], Optional[Mapping[str, Any]]],
               key: Callable[[T], Hashable] = lambda c: c) -> list[T]:  # fmt: skip
        """Ranked candidates: [less loaded, other] of two random ones (or the single candidate)."""
        now = self.clock()
        capacity: tuple[Optional[float], Optional[float]] = (None, None)
        if self.role != "prefill":
            for c in candidates:  # the capacity of any replica that reported (one config per deployment)
                load = self.fresh_load(stats_of(c), now)
                if load is not None and load.max_seqs and load.kv_budget_tokens:
                    capacity = (load.max_seqs, load.kv_budget_tokens)
                    break
        return power_of_two_choices(candidates, lambda c: self.score(key(c), stats_of(c), capacity, now), self.rng)

    def sent(self, replica: Hashable, request: Hashable, cost: PendingLoad) -> None:
        self.tracker.sent(replica, request, cost, self.clock())

    def done(self, replica: Hashable, request: Hashable) -> None:
        self.tracker.done(replica, request)


def request_cost(prompt_tokens: int, n: int = 1, max_tokens: int = 0) -> PendingLoad:
    """The load one request adds: its prompt to prefill, n sequences, n x (prompt + max_tokens) KV tokens."""
    return PendingLoad(float(prompt_tokens), float(n), float(n * (prompt_tokens + max_tokens)), 1)
