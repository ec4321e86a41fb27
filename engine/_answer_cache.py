"""Stored LM answers: their encoding, and the per-process cache (LRU, TTL, bounded by count and size).

An answer is one LM call's :class:`Completion` (texts, usage, reasoning). In memory it is kept as it
is; in Redis as compact JSON (:func:`encode`), versioned, so that anything else under the key (an
older format, a value cut short, bytes that are not UTF-8 JSON) reads as corrupt (:func:`decode`
raises :class:`CorruptAnswerError`) and the caller treats it as a miss. Sizes are the encoded JSON's,
in bytes, in both places: one ``max_entry_bytes`` means the same everywhere.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Generic, TypeVar

import attrs
import trio

from .lm._base import Completion

_FORMAT = 1

V = TypeVar("V")


class CorruptAnswerError(Exception):
    """A stored value that is not an answer of this version."""


def encode(completion: Completion) -> str:
    """The stored form of an answer: ``{"v": 1, "t": texts, "u": usage, "r": reasoning}``."""
    return json.dumps(
        {
            "v": _FORMAT,
            "t": list(completion.texts),
            "u": dict(completion.usage),
            "r": list(completion.reasoning),
            **({"f": list(completion.finish_reasons)} if completion.finish_reasons else {}),
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )


def _is_text_list(value: Any, *, optional: bool = False) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, str) or (optional and item is None) for item in value
    )


def decode(stored: str | bytes) -> Completion:
    """An answer read back.

    Raises:
        CorruptAnswerError: the value is not an answer of this version.
    """
    try:
        value = json.loads(stored)
    except (ValueError, TypeError) as exc:  # not JSON, not UTF-8, not text
        raise CorruptAnswerError(f"not JSON: {type(exc).__name__}") from exc
    if not isinstance(value, dict) or value.get("v") != _FORMAT:
        raise CorruptAnswerError("not an answer of this version")
    texts, usage, reasoning = value.get("t"), value.get("u"), value.get("r", [])
    if not _is_text_list(texts) or not texts or not isinstance(usage, dict):
        raise CorruptAnswerError("an answer without texts or usage")
    if not _is_text_list(reasoning, optional=True):
        raise CorruptAnswerError("malformed reasoning")
    if "f" not in value:
        return Completion(texts, usage, reasoning)
    if not _is_text_list(finish_reasons := value["f"], optional=True):
        raise CorruptAnswerError("malformed finish reasons")
    return Completion(texts, usage, reasoning, finish_reasons=finish_reasons)


def size_of(completion: Completion) -> int:
    """The answer's size as stored (its encoded JSON, in bytes)."""
    return len(encode(completion).encode("utf-8", "surrogatepass"))


@attrs.frozen
class _Entry(Generic[V]):
    value: V
    size: int
    expires: float


class MemoryAnswerCache(Generic[V]):
    """Answers of this process, least recently used out first. Times are Trio's clock. Never blocks.

    An answer is an LM call's :class:`Completion`, or a whole prediction's (``_shared_predictions``):
    both kinds live in one cache, within the same bounds.

    Args:
        ttl: Seconds an answer is served.
        max_entries: At most this many answers.
        max_bytes: At most this many bytes of answers (their encoded size).
    """

    def __init__(self, *, ttl: float, max_entries: int, max_bytes: int) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry[V]] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<MemoryAnswerCache [{len(self._entries)} answers, {self.bytes} bytes]>"

    def get(self, key: str) -> V | None:
        """The answer stored under ``key`` and still fresh, or None (an expired one is removed)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= trio.current_time():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry.value

    def put(self, key: str, completion: V, size: int) -> None:
        """Store ``completion`` (of ``size`` bytes, :func:`size_of`) under ``key``, making room by
        dropping the least recently used answers."""
        if key in self._entries:
            self._remove(key)
        if size > self._max_bytes:
            return
        self._entries[key] = _Entry(completion, size, trio.current_time() + self._ttl)
        self.bytes += size
        while len(self._entries) > self._max_entries or self.bytes > self._max_bytes:
            self._remove(next(iter(self._entries)))
            self.evictions += 1

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size

    def ttl_left(self, key: str) -> float:
        """Seconds the answer under ``key`` has left (0 when there is none). For tests and tools."""
        entry = self._entries.get(key)
        return max(0.0, entry.expires - trio.current_time()) if entry is not None else 0.0
