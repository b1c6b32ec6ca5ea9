"""MoE compute kernels (dropless expert MLPs) and expert parallelism; see kernels/moe.py for the shape legend."""

from ernie_platform.kernels.expert_parallel import (
    ExpertParallel,
    allreduce_gradients,
    expert_parameters,
    experts_per_rank,
    gather_experts,
    identity_placement,
    local_experts,
    new_expert_parallel_groups,
    shard_experts,
    slot_location,
    validate_placement,
)
from ernie_platform.kernels.moe import BACKENDS, RoutingPlan, moe_experts, plan_routing

__all__ = [
    "BACKENDS",
    "ExpertParallel",
    "RoutingPlan",
    "allreduce_gradients",
    "expert_parameters",
    "experts_per_rank",
    "gather_experts",
    "identity_placement",
    "local_experts",
    "moe_experts",
    "new_expert_parallel_groups",
    "plan_routing",
    "shard_experts",
    "slot_location",
    "validate_placement",
]
