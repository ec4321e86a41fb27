"""What one request allows the sharing layer to do, and which of its answers may be stored.

A request runs its program inside :func:`sharing_scope`, which puts its switches where its LM calls
see them (a context variable, so nested tasks of the program see them too): who it is (its API key,
the scope of what it may share), ``no_cache`` (never join a call in flight, never read the cache: a
fresh upstream call) and ``no_store`` (its answers are not stored).

An answer is stored only once the program's adapter parsed it: each upstream answer the request
receives comes with a :class:`Ticket`, and the adapter's successful parse of its text (heard through
:func:`heard_parse`, which ``_dspy``'s adapters call) settles the ticket as good; the request's end
settles every ticket still open as not good (the parse failed, the program failed or was cancelled).
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio


class Ticket:
    """An answer waiting for the adapter's verdict: good once each of its texts parsed.

    Args:
        texts: The answer's texts (one per choice).
        settle: Called once: ``settle(good, store)``, ``store`` being whether this request lets its
            answers be stored.
        store: The request's ``not no_store``.
    """

    __slots__ = ("_settle", "remaining", "store")

    def __init__(self, texts: Sequence[str], settle: Callable[[bool, bool], None], store: bool) -> None:
        self.remaining = list(texts)
        self._settle: Callable[[bool, bool], None] | None = settle
        self.store = store

    def settle(self, good: bool) -> None:
        """Give the verdict (only the first counts)."""
        settle, self._settle = self._settle, None
        if settle is not None:
            settle(good, self.store)


@attrs.define(eq=False)
class RequestSharing:
    """One request's switches and its answers waiting for a verdict.

    Attributes:
        owner: The request's owner (its API key), None for none.
        no_cache: Neither join an identical call in flight nor read the cache.
        no_store: Store none of its answers.
        tickets: Its answers waiting for the adapter's verdict.
        direct: The program runs for a shared prediction (``_shared_predictions``), which is shared
            and stored whole: its LM calls need not be shared or stored one by one, unless another
            process or an identical streamed call in flight could share them.
        received: Texts of LM answers the request received.
        parsed: Of those, the ones its adapter parsed.
        texts: The texts of the last LM answer it received.
    """

    owner: str | None = None
    no_cache: bool = False
    no_store: bool = False
    tickets: list[Ticket] = attrs.field(factory=list)
    direct: bool = False
    received: int = 0
    parsed: int = 0
    texts: Sequence[str] = ()

    def got(self, texts: Sequence[str]) -> None:
        """The request received an LM answer of these texts."""
        self.received += len(texts)
        self.texts = texts

    @property
    def all_parsed(self) -> bool:
        """Whether the request received LM answers and its adapter parsed every one of them (DSPy's
        fallback from ChatAdapter to JSONAdapter parses with an adapter that does not tell)."""
        return 0 < self.received == self.parsed

    def heard_parse(self, text: str) -> None:
        self.parsed += 1
        for ticket in self.tickets:
            if text in ticket.remaining:
                ticket.remaining.remove(text)
                if not ticket.remaining:
                    self.tickets.remove(ticket)
                    ticket.settle(True)
                return


_current: contextvars.ContextVar[RequestSharing | None] = contextvars.ContextVar(
    "dspy_trio_request_sharing", default=None
)

_DEFAULT = RequestSharing()
OUTSIDE = _DEFAULT  # what :func:`current` is outside a request: it counts nothing


def current() -> RequestSharing:
    """The switches of the request running now (defaults outside a request: share, store nothing)."""
    return _current.get() or _DEFAULT


def in_request() -> bool:
    """Whether a request's :func:`sharing_scope` is open here (only requests store answers)."""
    return _current.get() is not None


class sharing_scope:  # lower case: used as ``with sharing_scope(...)``, like the function it was
    """Open one request's switches for the block; on exit every ticket still open is settled as not
    good. Yields them (what the request received and parsed is counted there).

    A plain class, not a generator context manager: it is entered once per request.
    """

    __slots__ = ("_token", "sharing")

    def __init__(
        self, owner: str | None, *, no_cache: bool = False, no_store: bool = False, direct: bool = False
    ) -> None:
        self.sharing = RequestSharing(owner, no_cache, no_store, direct=direct)
        self._token: contextvars.Token[RequestSharing | None] | None = None

    def __enter__(self) -> RequestSharing:
        self._token = _current.set(self.sharing)
        return self.sharing

    def __exit__(self, *exc_info: object) -> None:
        assert self._token is not None
        _current.reset(self._token)
        sharing = self.sharing
        if sharing.tickets:
            tickets, sharing.tickets = sharing.tickets, []
            for ticket in tickets:
                ticket.settle(False)


def detach() -> None:
    """Leave every request's switches behind in this task (a shared call's, which serves many). Only
    for a task of its own: its context is a copy, so nothing outside it changes."""
    _current.set(None)


def heard_parse(text: str) -> None:
    """The adapter parsed ``text``: settle the current request's ticket for it, if any. Never blocks."""
    sharing = _current.get()
    if sharing is not None:
        sharing.heard_parse(text)


class Verdict:
    """The adapter's verdict on one upstream answer, from the tickets of every request that received it:
    ``good`` once any of them parsed it, ``storable`` once one that lets its answers be stored did
    (``on_store`` is called then, once).

    Args:
        on_store: What storing the answer is (e.g. a put into the memory cache). Never blocks.
    """

    def __init__(self, on_store: Callable[[], None] | None = None) -> None:
        self.good = False
        self.storable = False
        self.pending = 0
        self._on_store = on_store
        self._changed = trio.lowlevel.ParkingLot()

    def ticket(self, texts: Sequence[str], *, store: bool) -> Ticket:
        """A ticket for one more request that received the answer."""
        self.pending += 1
        return Ticket(texts, self._settle, store)

    def _settle(self, good: bool, store: bool) -> None:
        self.pending -= 1
        if good:
            self.good = True
            if store and not self.storable:
                self.storable = True
                if self._on_store is not None:
                    self._on_store()
        self._changed.unpark_all()

    async def wait(self, received: Callable[[], Awaitable[None]]) -> None:
        """Wait until the answer is known to be good, or every request that received it (``received()``
        returns once all have it) has said it is not. Blocks."""
        await received()
        while not self.good and self.pending:
            await self._changed.park()
