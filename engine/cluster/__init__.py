"""Scaling out: the state that every worker and replica of a deployment shares through Redis.

What is shared: each upstream's RPM/TPM buckets (atomic Lua on the server), its 429/503 cool-down
(pub/sub), the registry of in-flight requests with cancel delivered to the owning process (pub/sub), and
heartbeats counting the processes. What is not: admission queues, adaptive concurrency, retry budgets,
connection pools — each process keeps its own. When Redis is unreachable every process falls back to
local limits (its share of the quota) and rejoins when Redis answers; no request waits on a dead Redis.
"""

from .._config import ClusterConfig
from ._cluster import Cluster, ClusterStatistics, open_cluster
from ._cooldown import SharedCoolDown
from ._quota import SharedQuota
from ._redis import RedisLink, RedisUnavailableError
from ._registry import Registry

__all__ = [
    "Cluster",
    "ClusterConfig",
    "ClusterStatistics",
    "RedisLink",
    "RedisUnavailableError",
    "Registry",
    "SharedCoolDown",
    "SharedQuota",
    "open_cluster",
]
