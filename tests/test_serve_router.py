"""Load-aware request routing (docs/balance.md, "Request routing"): the Ray-free scores and power-of-two-choices
policy of `ernie_platform.balance.routing`, the engine replica's routing stats, the request costs the Serve router
counts, and the `serve.router` config. The running app's use of the router is checked in tests/test_serve_app.py."""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ernie_platform.balance import (
    LoadRouterPolicy,
    LocalLoadTracker,
    PendingLoad,
    ReplicaLoad,
    decode_score,
    power_of_two_choices,
    prefill_score,
    request_cost,
)
from ernie_platform.balance.routing import TIE_WEIGHT

NOW = 1000.0


def stats(t: float = NOW, **kw: float) -> dict[str, float]:
    base = {"max_seqs": 8.0, "kv_budget_tokens": 1000.0}
    return ReplicaLoad(**{**base, **kw}, timestamp=t).to_stats()


# ---- scores -----------------------------------------------------------------------------------------------------
def test_prefill_score_counts_reported_and_pending_prompt_tokens() -> None:
    assert prefill_score(ReplicaLoad(queued_prompt_tokens=300)) == 300
    assert prefill_score(ReplicaLoad(queued_prompt_tokens=300), request_cost(50) + request_cost(20)) == 370
    assert prefill_score(None, request_cost(7)) == 7  # no report: what this router sent
    assert prefill_score(None) == 0
    # decode-side numbers do not matter to a prefill replica
    assert prefill_score(ReplicaLoad(running_seqs=30, kv_usage=0.9)) == 0


def test_decode_score_is_the_scarcer_resource_with_queued_requests_counted() -> None:
    rows_bound = ReplicaLoad(running_seqs=6, max_seqs=8, kv_usage=0.25, kv_budget_tokens=1000)
    assert decode_score(rows_bound) == pytest.approx(0.75 + TIE_WEIGHT * 0.25)
    kv_bound = ReplicaLoad(running_seqs=2, max_seqs=8, kv_usage=0.9, kv_budget_tokens=1000)
    assert decode_score(kv_bound) == pytest.approx(0.9 + TIE_WEIGHT * 0.25)
    # waiting sequences and their KV count as if admitted
    waiting = ReplicaLoad(running_seqs=2, waiting_seqs=4, max_seqs=8, kv_usage=0.1, waiting_kv_tokens=200,
                          kv_budget_tokens=1000)  # fmt: skip
    assert decode_score(waiting) == pytest.approx(0.75 + TIE_WEIGHT * 0.3)
    # pending requests of this router: n sequences, n x (prompt + max_tokens) KV tokens
    assert decode_score(ReplicaLoad(max_seqs=8, kv_budget_tokens=1000), request_cost(100, n=2, max_tokens=150)) == (
        pytest.approx(0.5 + TIE_WEIGHT * 0.25)
    )
    # equal bottleneck: the other resource orders them
    assert decode_score(rows_bound) < decode_score(ReplicaLoad(running_seqs=6, max_seqs=8, kv_usage=0.7,
                                                               kv_budget_tokens=1000))  # fmt: skip
    # a replica queueing beyond its batch scores above 1
    assert decode_score(ReplicaLoad(running_seqs=8, waiting_seqs=8, max_seqs=8, kv_budget_tokens=1000)) > 1.9


def test_decode_score_capacity_fallback() -> None:
    pending = request_cost(10, n=2, max_tokens=10)
    assert decode_score(None, pending, max_seqs=4, kv_budget_tokens=400) == pytest.approx(0.5 + TIE_WEIGHT * 0.1)
    assert decode_score(None) == 0.0
    # no capacity at all: still monotone in the pending work
    assert decode_score(None, pending) < decode_score(None, pending + pending)


def test_replica_load_from_stats() -> None:
    good = stats(running_seqs=3, kv_usage=0.5)
    load = ReplicaLoad.from_stats(good)
    assert load is not None and load.running_seqs == 3 and load.kv_usage == 0.5 and load.timestamp == NOW
    assert ReplicaLoad.from_stats(load.to_stats()) == load
    assert ReplicaLoad.from_stats({}) is None  # Serve's value before the first report
    assert ReplicaLoad.from_stats(None) is None
    assert ReplicaLoad.from_stats({"running_seqs": 1.0}) is None  # no timestamp
    for bad in ("x", float("nan"), float("inf"), -1.0, None):
        assert ReplicaLoad.from_stats({**good, "kv_usage": bad}) is None, bad
    assert ReplicaLoad.from_stats({"timestamp": NOW}) == ReplicaLoad(timestamp=NOW)  # missing fields: 0


# ---- power of two choices ---------------------------------------------------------------------------------------
def test_p2c_picks_the_less_loaded_of_its_two_distinct_samples() -> None:
    rng = random.Random(0)
    loads = {f"r{i}": float(rng.randrange(100)) for i in range(6)}
    cands = sorted(loads)
    for seed in range(300):
        scored: list[str] = []
        ranked = power_of_two_choices(cands, lambda c, seen=scored: seen.append(c) or loads[c], random.Random(seed))
        assert len(ranked) == 2 and ranked[0] != ranked[1]
        assert sorted(scored) == sorted(ranked)  # only the two drawn candidates are scored
        assert loads[ranked[0]] <= loads[ranked[1]]
    assert power_of_two_choices(["only"], lambda c: 1e9, random.Random(0)) == ["only"]
    assert power_of_two_choices([], lambda c: 0.0, random.Random(0)) == []


def test_p2c_is_seeded_and_ties_keep_the_uniform_draw_order() -> None:
    cands = ["a", "b", "c", "d"]
    runs = [[tuple(power_of_two_choices(cands, lambda c: 0.0, rng)) for _ in range(50)]
            for rng in (random.Random(7), random.Random(7))]  # fmt: skip
    assert runs[0] == runs[1]  # deterministic for a seeded RNG
    firsts = Counter(power_of_two_choices(cands, lambda c: 0.0, r)[0] for r in [random.Random(1)] * 4000)
    assert set(firsts) == set(cands) and max(firsts.values()) / min(firsts.values()) < 1.25  # no bias on ties
    pairs = Counter(frozenset(power_of_two_choices(cands, lambda c: 0.0, r)) for r in [random.Random(2)] * 6000)
    assert len(pairs) == 6 and max(pairs.values()) / min(pairs.values()) < 1.3  # every pair drawn alike


def test_traffic_shifts_away_from_a_loaded_replica() -> None:
    cands = ["a", "b", "c", "d"]
    loads = {"a": 0.0, "b": 0.1, "c": 0.2, "d": 5.0}
    rng = random.Random(3)
    firsts = Counter(power_of_two_choices(cands, loads.__getitem__, rng)[0] for _ in range(3000))
    assert firsts["d"] == 0  # the most loaded one never wins a draw
    assert firsts["a"] > firsts["b"] > firsts["c"]  # wins = draws against a more loaded replica: 3/6, 2/6, 1/6
    assert firsts["a"] / 3000 == pytest.approx(0.5, abs=0.04)
    # the uniform draw alone would send a quarter of the traffic to d
    uniform = Counter(rng.choice(cands) for _ in range(3000))
    assert uniform["d"] > 600


# ---- the policy: reports, local accounting, staleness -----------------------------------------------------------
class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _route(policy: LoadRouterPolicy, cands: list[str], stats_of: dict, n: int, cost: PendingLoad) -> Counter:
    got: Counter = Counter()
    for _ in range(n):
        best = policy.choose(cands, lambda c: stats_of.get(c))[0]
        policy.sent(best, object(), cost)
        got[best] += 1
    return got


def test_local_accounting_prevents_herding_on_one_snapshot() -> None:
    """One report of two decode replicas, then a burst before the next: without counting its own sends the router
    would send the whole burst to the lighter one; with them the burst evens the two out."""
    snapshot = {"a": stats(running_seqs=1), "b": stats(running_seqs=3)}
    clock = Clock(NOW + 0.5)
    policy = LoadRouterPolicy("decode", rng=random.Random(0), clock=clock)
    got = _route(policy, ["a", "b"], snapshot, 20, request_cost(10, n=1, max_tokens=10))
    assert got["a"] == 11 and got["b"] == 9  # a takes 2 to catch up, then they alternate
    herd = LoadRouterPolicy("decode", rng=random.Random(0), clock=clock)
    assert Counter(herd.choose(["a", "b"], snapshot.get)[0] for _ in range(20)) == Counter(a=20)
    # a report taken after the sends includes them: they stop counting twice
    policy.tracker.sent("a", "old", request_cost(10), NOW + 0.1)
    newer = {"a": stats(t=NOW + 1, running_seqs=12), "b": stats(t=NOW + 1, running_seqs=12)}
    clock.t = NOW + 1.2
    assert policy.score("a", newer["a"]) == pytest.approx(policy.score("b", newer["b"]))
    # ... but sends after the report still count; completed requests do not
    policy.sent("a", "new", request_cost(10))
    assert policy.score("a", newer["a"]) > policy.score("b", newer["b"])
    policy.done("a", "new")
    assert policy.score("a", newer["a"]) == pytest.approx(policy.score("b", newer["b"]))


def test_prefill_policy_routes_by_queued_prompt_tokens() -> None:
    policy = LoadRouterPolicy("prefill", rng=random.Random(0), clock=Clock(NOW + 0.2))
    reports = {"a": stats(queued_prompt_tokens=900), "b": stats(queued_prompt_tokens=100, running_seqs=99)}
    assert policy.choose(["a", "b"], reports.get)[0] == "b"
    assert _route(policy, ["a", "b"], reports, 8, request_cost(100)) == Counter(b=8)  # b catches up to 900 tokens
    _route(policy, ["a", "b"], reports, 11, request_cost(100))  # then they share
    a, b = (policy.score(r, reports[r]) for r in "ab")
    assert a + b == 900 + 100 + 19 * 100 and abs(a - b) <= 100


def test_stale_and_missing_stats() -> None:
    clock = Clock()
    policy = LoadRouterPolicy("decode", stale_after_s=5.0, rng=random.Random(0), clock=clock)
    busy = stats(running_seqs=8, waiting_seqs=8)
    policy.sent("a", "r1", request_cost(10, n=2))
    policy.sent("a", "r2", request_cost(10, n=2))
    # a fresh report counts; sends before it are in it
    assert policy.score("a", busy, (8, 1000)) == pytest.approx(decode_score(ReplicaLoad.from_stats(busy)))
    # 6 s later the report is stale: only this router's requests in flight (4 of 8 rows) count
    clock.t = NOW + 6
    assert policy.fresh_load(busy) is None
    assert policy.score("a", busy, (8, 1000)) == pytest.approx(decode_score(None, request_cost(10, n=4), 8, 1000))
    # a replica without a report yet (Serve's `{}`) is scored from the local count, with the capacity of a
    # replica that reported: an empty newcomer takes traffic from a loaded one, until it has its share
    fresh = {"old": stats(t=clock.t, running_seqs=4), "new": {}}
    clock.t += 0.1
    got = _route(policy, ["old", "new"], fresh, 6, request_cost(10, n=1, max_tokens=10))
    assert got == Counter(new=5, old=1)
    # malformed reports are ignored like missing ones
    assert policy.score("x", {"timestamp": "soon"}) == policy.score("x", {})


def test_single_replica_and_empty() -> None:
    policy = LoadRouterPolicy("decode", rng=random.Random(0))
    assert policy.choose(["only"], lambda c: stats(running_seqs=100)) == ["only"]
    assert policy.choose([], lambda c: None) == []
    with pytest.raises(ValueError, match="routing role 'router'"):
        LoadRouterPolicy("router")
    with pytest.raises(ValueError, match="stale_after_s=0"):
        LoadRouterPolicy("decode", stale_after_s=0)


def test_local_tracker() -> None:
    t = LocalLoadTracker()
    t.sent("a", 1, request_cost(5), at=1.0)
    t.sent("a", 2, request_cost(7), at=3.0)
    t.sent("b", 3, request_cost(11), at=2.0)
    assert t.pending("a").prompt_tokens == 12 and t.pending("a", since=2.0).prompt_tokens == 7
    assert t.pending("a").requests == 2 and t.pending("zzz") == PendingLoad()
    t.done("a", 1)
    assert t.pending("a").prompt_tokens == 7
    t.done("c", 9)  # completion seen before the send (request finished while its router awaited the accept)
    t.sent("c", 9, request_cost(3), at=4.0)
    assert t.pending("c").requests == 0
    t.retain(["a"])
    assert t.pending("b").requests == 0 and t.pending("a").requests == 1
    t.forget("a")
    assert t.pending("a").requests == 0


# ---- the Serve router's request costs ---------------------------------------------------------------------------
def test_cost_of_call() -> None:
    from ernie_platform.inference import SamplingParams
    from ernie_platform.serving.responses import KVRef
    from ernie_platform.serving.router import cost_of_call

    p = SamplingParams(max_tokens=20, n=3)
    assert cost_of_call("prefill", "prefill", ([1] * 40, p), {}) == request_cost(40)
    assert cost_of_call("decode", "generate", ("id", [1] * 5, p, False), {}) == request_cost(5, 3, 20)
    assert cost_of_call("decode", "generate", ("id", KVRef(object(), 40), p, False), {}) == request_cost(40, 3, 20)
    assert cost_of_call("colocated", "generate", (), {"prompt": [1, 2], "params": p}) == request_cost(2, 3, 20)
    assert cost_of_call("decode", "generate", ("id", object(), p), {}) == request_cost(0, 3, 20)  # length unknown
    for role, method in (("decode", "stats"), ("decode", "actor_name"), ("prefill", "generate")):
        assert cost_of_call(role, method, (), {}).requests == 0


# ---- the engine replica's report --------------------------------------------------------------------------------
def test_engine_server_routing_stats(tiny_moe_ckpt: Path) -> None:
    from ernie_platform.inference import SamplingParams
    from ernie_platform.serving.engine_server import EngineServer
    from ernie_platform.serving.responses import KVRef

    cfg = {"max_batch_size": 4, "max_seq_len": 64, "kv_budget_tokens": 200, "dtype": None, "device": "cpu",
           "torch_threads": 1, "max_n": 2}  # fmt: skip
    p = SamplingParams(max_tokens=6, temperature=0, n=2)

    async def decode_side() -> list[dict[str, Any]]:
        server = EngineServer("decode", str(tiny_moe_ckpt), cfg)
        try:
            out = [await server.record_routing_stats()]
            server.engine.add_request("q", [16] * 10, p)  # queued, not admitted (no step loop running)
            out.append(await server.record_routing_stats())
            fut: asyncio.Future = asyncio.get_running_loop().create_future()  # a prefill result not there yet
            gen = server.generate("r", KVRef(fut, 30), p)
            task = asyncio.ensure_future(gen.__anext__())
            await asyncio.sleep(0.05)
            out.append(await server.record_routing_stats())
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await gen.aclose()
            out.append(await server.record_routing_stats())
            return out
        finally:
            server.__del__()

    empty, queued, arriving, gone = asyncio.run(decode_side())
    assert empty["running_seqs"] == empty["waiting_seqs"] == empty["queued_prompt_tokens"] == 0
    assert empty["max_seqs"] == 4 and empty["kv_budget_tokens"] == 200 and empty["timestamp"] > 0
    assert ReplicaLoad.from_stats(empty) is not None
    assert queued["waiting_seqs"] == 2 and queued["waiting_kv_tokens"] == 2 * 16
    assert queued["queued_prompt_tokens"] == 10  # to prefill here
    assert arriving["waiting_seqs"] == 4 and arriving["waiting_kv_tokens"] == 32 + 2 * 36
    assert arriving["queued_prompt_tokens"] == 10  # its KV comes prefilled
    assert gone["waiting_seqs"] == 2  # the cancelled arrival is gone

    async def prefill_side() -> dict[str, Any]:
        server = EngineServer("prefill", str(tiny_moe_ckpt), cfg)
        release = threading.Event()
        real = server.engine.prefill_batch

        def blocked(ps: list, sps: list, *rest: Any) -> list:
            release.wait(10)
            return real(ps, sps, *rest)

        server.engine.prefill_batch = blocked
        try:
            calls = [asyncio.ensure_future(server.prefill([16] * n, SamplingParams(max_tokens=2))) for n in (7, 5)]
            await asyncio.sleep(0.05)  # both in the first batch, which is blocked
            calls.append(asyncio.ensure_future(server.prefill([16] * 3, SamplingParams(max_tokens=2))))
            await asyncio.sleep(0.05)  # waits for the next batch
            s = await server.record_routing_stats()
            release.set()
            await asyncio.gather(*calls)
            s2 = await server.record_routing_stats()
            return {"during": s, "after": s2}
        finally:
            release.set()
            server.__del__()

    r = asyncio.run(prefill_side())
    assert r["during"]["queued_prompt_tokens"] == 7 + 5 + 3
    assert r["after"]["queued_prompt_tokens"] == 0


# ---- config -----------------------------------------------------------------------------------------------------
def test_serve_router_config(tmp_path: Path) -> None:
    from ernie_platform.serving.app import request_router_settings, resolve_serve_config
    from workloads.serve.app import build_app, compose_config

    base = {"run.storage_path": str(tmp_path)}
    s = resolve_serve_config(compose_config(base))["serve"]
    assert s["router"] == "load" and s["routing_stats_period_s"] == 1.0
    got = request_router_settings(s, "prefill")
    assert got["request_router_class"] == "ernie_platform.serving.router.PrefillLoadRouter"
    assert got["request_router_kwargs"] == {"role": "prefill", "stale_after_s": 5.0}
    assert got["request_routing_stats_period_s"] == 1.0
    assert request_router_settings(s, "colocated")["request_router_class"].endswith(".DecodeLoadRouter")
    assert request_router_settings({**s, "router": "pow2"}, "decode") is None
    p = "serve.routing_stats_period_s"
    for key, value, msg in (("serve.router", "rr", "serve.router='rr' is not valid (expected load or pow2)"),
                            (p, 0, f"{p}=0.0 must be"), (p, -2.5, f"{p}=-2.5 must be")):  # fmt: skip
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            resolve_serve_config(compose_config({**base, key: value}))
    # the deployments carry the router (pd: both engine deployments; pow2: Serve's default)
    from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

    from ernie_platform.serving.router import DecodeLoadRouter, PrefillLoadRouter

    def routers(app: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for d in app._bound_deployment.init_args[1:]:
            if d is not None:
                rc = d._bound_deployment._deployment_config.request_router_config
                out[d._bound_deployment.name] = (rc.get_request_router_class(), rc.request_routing_stats_period_s)
        return out

    assert routers(build_app({**base, "serve.routing_stats_period_s": 0.5})) == {
        "Prefill": (PrefillLoadRouter, 0.5), "Decode": (DecodeLoadRouter, 0.5)}  # fmt: skip
    assert routers(build_app({**base, "serve.mode": "colocated"})) == {"Engine": (DecodeLoadRouter, 1.0)}
    assert routers(build_app({**base, "serve.router": "pow2"}))["Decode"][0] is PowerOfTwoChoicesRequestRouter
