"""Cancel by id in every process of a cluster: one broadcast, answered by each process.

Nothing is written to Redis for a request that is never cancelled. A cancel that finds nothing in its own
process publishes the id (with a keyed digest of the owner, never the owner) on one channel that every
process listens to; each process cancels what it runs under that id (requests, streams, batches), checks
the owner there with the same rule as a local cancel (:mod:`dspy_trio.engine._owners`, on digests), and
answers on the canceller's own channel whether it found anything. The canceller returns as soon as one process
found it, or once every process that received the broadcast (``PUBLISH`` counts them) said no.

Because the request is looked up in the ledger of the process that runs it, there is no registration
to race: a cancel sent the instant a request was accepted finds it.

Owners' digests only match between processes with the same ``[cluster] secret``. So a cancel carries the
fingerprint of its sender's secret (:attr:`OwnerDigest.fingerprint`); a process whose own differs cannot
check the owner, says so in its answer (and in its log), and a cancel that nobody found then fails with
``ClusterUnavailableError`` naming the secret, instead of reading "no such request" for a request that
may run on (a rolling deploy that sets the secret, a typo in one replica's).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .._errors import ClusterUnavailableError
from .._owners import OwnerCheck, anyone
from ._redis import RedisLink, RedisUnavailableError

logger = logging.getLogger("dspy_trio.engine.cluster")

# Cancels what this process runs under an id, for the owners the check accepts; whether it found any.
LocalCancel = Callable[[str, OwnerCheck], bool]


class OwnerDigest:
    """The owner as other processes see it: ``HMAC-SHA256(secret, owner)``, hex.

    The secret is the deployment's (``[cluster] secret``): without it, a digest seen in Redis cannot be
    tested against guessed API keys.
    """

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._known: dict[str, str] = {}  # API keys are few: each is hashed once
        # Which secret digests are keyed with, for comparing with other processes' (never an owner's).
        self.fingerprint = hmac.new(secret, b"dspy-trio cluster secret", hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:
        return "<OwnerDigest>"

    def __call__(self, owner: str) -> str:
        digest = self._known.get(owner)
        if digest is None:
            digest = hmac.new(self._secret, owner.encode(), hashlib.sha256).hexdigest()
            if len(self._known) < 4096:
                self._known[owner] = digest
        return digest

    def check(self, digest: str | None) -> OwnerCheck:
        """The ownership rule of :mod:`dspy_trio.engine._owners` for a cancel that carries ``digest``."""
        if digest is None:
            return anyone

        def same_owner(started_by: str | None) -> bool:
            return started_by is not None and hmac.compare_digest(self(started_by), digest)

        return same_owner


@attrs.define
class _Asked:
    """A cancel waiting for the other processes' answers."""

    receivers: int | None = None  # how many processes the broadcast reached (None: not known yet)
    answers: int = 0
    found: bool = False
    other_secret: int = 0  # answers from processes whose secret differs (they could not check the owner)
    done: trio.Event = attrs.field(factory=trio.Event)

    def update(self) -> None:
        if self.found or (self.receivers is not None and self.answers >= self.receivers):
            self.done.set()


class CancelRelay:
    """Cancels by id across processes (see the module docstring).

    Args:
        link: The process's Redis link.
        digest: How owners are digested (the deployment's secret).
        subscribed: Whether this process hears its channels now (the answers come on one of them).
    """

    def __init__(self, link: RedisLink, digest: OwnerDigest, subscribed: Callable[[], bool]) -> None:
        self._link = link
        self._digest = digest
        self._subscribed = subscribed
        self._local: LocalCancel | None = None
        self._asked: dict[str, _Asked] = {}
        self.broadcast_channel = link.key("cancel")
        self.answer_channel = link.key("cancel", link.process_id)

    def attach(self, cancel: LocalCancel) -> None:
        """Cancel what this process runs with ``cancel`` when another process asks."""
        self._local = cancel

    async def cancel(self, request_id: str, *, owner: str | None = None) -> bool:
        """Cancel ``request_id`` in every process that runs it, for ``owner`` (None: the application).

        Returns whether any process cancelled something. Blocks for one bounded Redis round-trip and
        then until every process reached has answered (at most twice ``call_timeout``).

        Raises:
            ClusterUnavailableError: Redis cannot be reached, this process does not hear answers now,
                or a process that received the cancel did not answer in time: whether the request
                runs elsewhere is unknown.
        """
        if not self._subscribed():
            raise ClusterUnavailableError(f"cannot hear the cluster's answers to cancel {request_id}")
        token = uuid.uuid4().hex
        message = json.dumps(
            {
                "id": request_id,
                "owner": None if owner is None else self._digest(owner),
                "reply": self.answer_channel,
                "token": token,
                "secret": self._digest.fingerprint,
            }
        )
        asked = self._asked[token] = _Asked()
        try:
            try:
                receivers = await self._link.call(
                    lambda: self._link.client.publish(self.broadcast_channel, message)
                )
            except RedisUnavailableError as exc:
                raise ClusterUnavailableError(
                    f"cannot reach the cluster to cancel {request_id}: {exc}"
                ) from exc
            asked.receivers = int(receivers)
            asked.update()
            with trio.move_on_after(2 * self._link.config.call_timeout):
                await asked.done.wait()
            if asked.found:
                return True
            if asked.other_secret:
                raise ClusterUnavailableError(
                    f"{asked.other_secret} of {asked.receivers} processes have another [cluster] secret "
                    f"and could not check the owner to cancel {request_id}: set the same secret in all"
                )
            if asked.receivers is not None and asked.answers >= asked.receivers:
                return False
            raise ClusterUnavailableError(
                f"{asked.receivers - asked.answers} of {asked.receivers} processes did not answer in time"
                f" to cancel {request_id}"
            )
        finally:
            del self._asked[token]

    def heard_cancel(self, data: str) -> None:
        """Act on a broadcast cancel (this process's own included) and answer it. Never blocks."""
        try:
            asked = json.loads(data)
            request_id, owner, reply, token = asked["id"], asked["owner"], asked["reply"], asked["token"]
            if not all(isinstance(v, str) for v in (request_id, reply, token)) or not isinstance(
                owner, str | None
            ):
                raise TypeError("malformed fields")
        except (ValueError, TypeError, KeyError):
            logger.warning("ignored a malformed cancel message: %r", data)
            return
        # A sender that names no secret (an older process) is taken at its word.
        other_secret = (
            owner is not None and asked.get("secret", self._digest.fingerprint) != self._digest.fingerprint
        )
        if other_secret:
            logger.warning(
                "a cancel of %r came from a process with another [cluster] secret: its owner cannot be "
                "checked here; set the same secret in every process",
                request_id,
            )
            found = False
        else:
            found = self._local is not None and self._local(request_id, self._digest.check(owner))
        answer = {"token": token, "found": found, **({"other_secret": True} if other_secret else {})}
        self._link.write_soon(("publish", reply, json.dumps(answer)))

    def heard_answer(self, data: str) -> None:
        """Count another process's answer to one of this process's cancels."""
        try:
            answer: Any = json.loads(data)
            token, found = answer["token"], bool(answer["found"])
            other_secret = bool(answer.get("other_secret"))
        except (ValueError, TypeError, KeyError, AttributeError):
            logger.warning("ignored a malformed cancel answer: %r", data)
            return
        if (asked := self._asked.get(token)) is not None:
            asked.answers += 1
            asked.found = asked.found or found
            asked.other_secret += other_secret
            asked.update()
