"""Expert load balancing: placement and replication of MoE experts over nodes × devices (EPLB-compatible tables),
quality metrics, and the ``report`` / ``simulate`` tools. See docs/balance.md."""

from ernie_platform.balance.align import align_to_previous
from ernie_platform.balance.loads import read_loads_file, read_loads_mlflow, zipf_loads
from ernie_platform.balance.metrics import (
    cross_node_traffic,
    device_loads,
    max_over_mean,
    migration_cost,
    node_loads,
    off_group_node_traffic,
    summarize,
)
from ernie_platform.balance.placement import (
    POLICIES,
    balanced_packing,
    contiguous_placement,
    rebalance_experts,
    rebalance_modalities,
    replicate,
    tables_from_phy2log,
)
from ernie_platform.balance.routing import (  # request routing by load (serving)
    LoadRouterPolicy,
    LocalLoadTracker,
    PendingLoad,
    ReplicaLoad,
    decode_score,
    power_of_two_choices,
    prefill_score,
    request_cost,
)

__all__ = [
    "LoadRouterPolicy",
    "LocalLoadTracker",
    "PendingLoad",
    "ReplicaLoad",
    "decode_score",
    "power_of_two_choices",
    "prefill_score",
    "request_cost",
    "POLICIES",
    "align_to_previous",
    "balanced_packing",
    "contiguous_placement",
    "cross_node_traffic",
    "device_loads",
    "max_over_mean",
    "migration_cost",
    "node_loads",
    "off_group_node_traffic",
    "read_loads_file",
    "read_loads_mlflow",
    "rebalance_experts",
    "rebalance_modalities",
    "replicate",
    "summarize",
    "tables_from_phy2log",
    "zipf_loads",
]
