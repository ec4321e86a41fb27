"""Scaling out: the state that every worker and replica of a deployment shares through Redis.

What is shared: each upstream's RPM/TPM quota (atomic Lua on the server), its 429/503 cool-down
(pub/sub), cancel by id (a pub/sub broadcast answered by each process), and heartbeats counting the
processes. What is not: admission queues, adaptive concurrency, retry budgets,
connection pools — each process keeps its own. When Redis is unreachable every process falls back to
local limits (its share of the quota) and rejoins when Redis answers; no request waits on a dead Redis.
"""

from .._cluster_config import ClusterConfig
from ._cancel import CancelRelay, OwnerDigest
from ._cluster import Cluster, ClusterStatistics, open_cluster
from ._cooldown import SharedCoolDown
from ._quota import SharedQuota
from ._redis import RedisLink, RedisUnavailableError

__all__ = [
    "CancelRelay",
    "Cluster",
    "ClusterConfig",
    "ClusterStatistics",
    "OwnerDigest",
    "RedisLink",
    "RedisUnavailableError",
    "SharedCoolDown",
    "SharedQuota",
    "open_cluster",
]
