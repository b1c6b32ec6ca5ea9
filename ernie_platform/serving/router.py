"""Ray Serve request routers that route by replica load (`serve.router=load`, the default).

Each engine deployment gets one of these as its `request_router_config.request_router_class`, so every handle to it
(the ingress' handles, a driver's `serve.get_deployment_handle`) routes this way:

* `PrefillLoadRouter` (Prefill deployment): the replica with fewer queued prompt tokens;
* `DecodeLoadRouter` (Decode and colocated Engine deployments): the replica whose scarcer resource (batch rows or KV
  budget, queued requests included) is less used;

each by power of two choices over the replicas' `record_routing_stats` reports (`EngineServer.record_routing_stats`,
every `serve.routing_stats_period_s`). The decision itself is `ernie_platform.balance.routing.LoadRouterPolicy`
(Ray-free; formulas in its module docstring and docs/balance.md). Requests are handed out in FIFO order (`FIFOMixin`)
as by Serve's default `PowerOfTwoChoicesRequestRouter`; multiplexed model ids are honoured (`MultiplexMixin`). Unlike
the default router, node locality does not restrict the candidates of engine calls: on a cluster it would pin each
ingress replica to the engine replicas of its own node whatever their load, and the KV of a disaggregated prompt
travels through the object store either way.

Calls that carry no work (`stats`, `actor_name`: /metrics, /health, tests) rotate over the replicas instead, so
that one call per replica reaches each of them.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

from ernie_platform.balance.routing import NO_PENDING, LoadRouterPolicy, PendingLoad, request_cost

log = logging.getLogger(__name__)

WORK_METHODS = {"prefill": "prefill", "decode": "generate", "colocated": "generate"}


def cost_of_call(role: str, method: str, args: Any, kwargs: Any) -> PendingLoad:
    """The load an engine call adds to its replica (NO_PENDING for calls that carry no work)."""
    if method != WORK_METHODS.get(role):
        return NO_PENDING
    args, kwargs = list(args or ()), dict(kwargs or {})
    if method == "prefill":  # prefill(prompt_ids, params): one forward over the prompt
        ids = args[0] if args else kwargs.get("prompt_ids")
        return request_cost(len(ids) if isinstance(ids, list) else 0)
    # generate(request_id, prompt, params, want_tokens)
    prompt = args[1] if len(args) > 1 else kwargs.get("prompt")
    params = args[2] if len(args) > 2 else kwargs.get("params")
    if isinstance(prompt, list):
        tokens = len(prompt)
    elif hasattr(prompt, "prompt_tokens"):  # KVRef
        tokens = int(prompt.prompt_tokens or 0)
    elif hasattr(prompt, "prompt_ids"):  # PrefillResult
        tokens = len(prompt.prompt_ids)
    else:  # a DeploymentResponse / ObjectRef not resolved yet: length unknown
        tokens = 0
    return request_cost(tokens, int(getattr(params, "n", 1) or 1), int(getattr(params, "max_tokens", 0) or 0))


class LoadAwareRequestRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Power of two choices by load score. `request_router_kwargs`: `role` (prefill, decode or colocated) and
    `stale_after_s` (a report older than this is ignored; see `LoadRouterPolicy`)."""

    default_role = "decode"

    def initialize_state(self, role: Optional[str] = None, stale_after_s: float = 5.0, seed: Optional[int] = None,
                         **kwargs: Any) -> None:  # fmt: skip
        import random

        self.role = role or self.default_role
        self.policy = LoadRouterPolicy(self.role, stale_after_s=stale_after_s, rng=random.Random(seed))
        self._next_control = 0

    def _ensure_policy(self) -> LoadRouterPolicy:
        if getattr(self, "policy", None) is None:  # constructed without initialize_state (not by Serve)
            self.initialize_state()
        return self.policy

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        policy = self._ensure_policy()
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            ids = self.apply_multiplex_routing(pending_request=pending_request)
        else:
            ids = self._replica_id_set
            if pending_request is not None:  # Serve's retry loop backs off between rounds only when this is set
                pending_request.routing_context.should_backoff = True
        replicas = [self._replicas[i] for i in ids if i in self._replicas]
        if not replicas:
            return []
        replicas.sort(key=lambda r: r.replica_id.unique_id)  # a stable order: the RNG alone decides the draw
        method = pending_request.metadata.call_method if pending_request is not None else ""
        if pending_request is not None and method != WORK_METHODS[self.role]:
            first = replicas[self._next_control % len(replicas)]
            self._next_control += 1
            rest = [r for r in replicas if r is not first]
            return [[first], rest] if rest else [[first]]
        ranked = policy.choose(replicas, lambda r: r.routing_stats, key=lambda r: r.replica_id)
        return [[r] for r in ranked]

    # Local accounting. Replicas report every `serve.routing_stats_period_s` and the report reaches the routers
    # through Serve's controller, so between two reports every router sees the same snapshot. Without counting its
    # own sends, the replica that looked lightest at the last report would win every draw it is part of until the
    # next one: with two replicas, a whole period's burst would herd onto one of them. So each request this router
    # routes is added to its replica's score (`LoadRouterPolicy.sent`), until a report taken after it was sent
    # includes it, or it completes.
    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        policy = self._ensure_policy()
        md = pending_request.metadata
        cost = cost_of_call(self.role, md.call_method, pending_request.args, pending_request.kwargs)
        if cost.requests:
            policy.sent(replica_id, md.internal_request_id, cost)

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        self._ensure_policy().done(replica_id, internal_request_id)

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        self._ensure_policy().tracker.forget(replica_id)

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._ensure_policy().tracker.retain([r.replica_id for r in replicas])


class PrefillLoadRouter(LoadAwareRequestRouter):
    """Prefill replicas: fewest queued prompt tokens."""

    default_role = "prefill"


class DecodeLoadRouter(LoadAwareRequestRouter):
    """Decode / colocated engine replicas: least used batch rows or KV budget."""

    default_role = "decode"
