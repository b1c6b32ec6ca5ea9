"""MoE compute kernels (dropless expert MLPs); see kernels/moe.py for the shape legend."""

from kernels.moe import BACKENDS, RoutingPlan, moe_experts, plan_routing

__all__ = ["BACKENDS", "RoutingPlan", "moe_experts", "plan_routing"]
