"""How a stream treats its consumer (``[stream]``, and the options of each stream)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

from ._tables import build, one_of
from ._validate import non_negative, non_negative_int, positive, positive_int

Backpressure = Literal["block", "timeout", "drop"]


@attrs.frozen
class StreamOptions:
    """How a stream treats its consumer. Defaults come from ``EngineConfig.stream``; each stream may
    override them.

    Attributes:
        backpressure: ``block`` (the producer, and so the upstream read, waits for the consumer),
            ``timeout`` (like block, but a consumer that takes nothing for ``consumer_timeout`` seconds
            ends the stream with ``SlowConsumerError``), or ``drop`` (never wait; drop the oldest deltas).
        buffer_size: Events buffered between producer and consumer.
        consumer_timeout: Seconds without progress before ``timeout`` gives up on the consumer.
        coalesce_chars: Merge consecutive deltas of a field up to this many characters (0: no limit
            when ``coalesce_ms`` is set, else no merging).
        coalesce_ms: Hold the newest delta of a field up to this long for more text to merge in.
    """

    backpressure: Backpressure = attrs.field(default="block", validator=one_of(("block", "timeout", "drop")))
    buffer_size: int = attrs.field(default=64, validator=positive_int)
    consumer_timeout: float = attrs.field(default=30.0, validator=positive)
    coalesce_chars: int = attrs.field(default=0, validator=non_negative_int)
    coalesce_ms: float = attrs.field(default=0.0, validator=non_negative)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str = "stream") -> StreamOptions:
        """Build from a TOML table."""
        return build(cls, data, where)
