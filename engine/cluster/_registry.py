"""Which process runs which request: a registry of in-flight request ids in Redis, and cancel by id
from any worker or replica.

Each request is registered when it starts (its id -> the owning process and the hash of its owner's
key, with a TTL a little past its deadline, so a process that dies leaves nothing behind for long) and
removed when it ends. Both are queued writes: registering never delays a request. A cancel sent to any
process reads the registry, checks the owner, and publishes the id on the owning process's own channel;
that process cancels the request as a local cancel would.

A cancel that arrives within the first milliseconds of a request (before its registration was written)
finds nothing and answers "not found", as it would for a request that had already ended.
"""

from __future__ import annotations

import hashlib
import json
import math

import trio

from .._errors import ClusterUnavailableError
from ._redis import RedisLink, RedisUnavailableError

_TTL_MARGIN = 30.0  # seconds a registration outlives its request's deadline
_TTL_LONGEST = 3600.0  # for requests without a deadline


def owner_digest(owner: str | None) -> str | None:
    """What the registry stores for an owner: a hash, never the key itself."""
    return None if owner is None else hashlib.sha256(owner.encode()).hexdigest()


class Registry:
    """In-flight requests of every process (see the module docstring)."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link

    def cancel_channel(self, process_id: str) -> str:
        return self._link.key("cancel", process_id)

    def started(self, request_id: str, *, owner: str | None = None, deadline: float = math.inf) -> None:
        """Register a request of this process. Never blocks."""
        left = deadline - trio.current_time()
        ttl = min(_TTL_LONGEST, left + _TTL_MARGIN) if math.isfinite(left) else _TTL_LONGEST
        value = json.dumps({"process": self._link.process_id, "owner": owner_digest(owner)})
        self._link.write_soon(("set", self._link.key("request", request_id), value, max(1.0, ttl) * 1000))

    def ended(self, request_id: str) -> None:
        """Remove a request of this process. Never blocks."""
        self._link.write_soon(("del", self._link.key("request", request_id)))

    async def cancel(self, request_id: str, *, owner: str | None = None) -> bool:
        """Cancel ``request_id`` in whichever process runs it. Returns whether one was told to.

        A request registered with an owner is only cancelled for the same owner; for anyone else it is
        "not found" (as if it did not exist). Blocks for two bounded round-trips at most.

        Raises:
            ClusterUnavailableError: Redis cannot be reached, so where the request runs is unknown.
        """
        try:
            raw = await self._link.call(lambda: self._link.client.get(self._link.key("request", request_id)))
            if raw is None:
                return False
            record = json.loads(raw)
            if record.get("owner") is not None and record["owner"] != owner_digest(owner):
                return False
            channel = self.cancel_channel(str(record["process"]))
            receivers = await self._link.call(lambda: self._link.client.publish(channel, request_id))
        except RedisUnavailableError as exc:
            raise ClusterUnavailableError(f"cannot reach the cluster to cancel {request_id}: {exc}") from exc
        return bool(receivers > 0)
