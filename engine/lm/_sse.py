"""Server-Sent Events from an answer's body bytes, bounded: one reader for both transports.

Lines are cut on the bytes (``\\n``, ``\\r\\n`` or ``\\r``, as SSE defines them; a ``\\r`` at the end of a
chunk and a ``\\n`` at the start of the next are one line end), which UTF-8 allows: neither byte occurs
inside a multi-byte character. An event's data is decoded once, when a blank line completes it, strictly:
an answer that is not UTF-8 is a bad answer, on a stream as in a JSON body (never U+FFFD).

One event's data (its ``data:`` values joined by ``\\n``) may hold at most ``max_event_bytes``, and so
may any single line, not counting a data line's ``data:`` / ``data: `` prefix: an upstream whose lines
never end an event is refused there, instead of being held in memory. The whole answer's cap is the body
decoder's (``_transport._body``), which sees every byte first.

One UTF-8 byte order mark at the start of the stream is dropped, as the SSE standard says (it would
otherwise become part of the first field's name and lose the first event).

Sync, so no async generator is left half-consumed: the transports feed bytes and hand each event on.
"""

from __future__ import annotations

from ._body import BadResponse

Event = tuple[str, str]
BOM = b"\xef\xbb\xbf"


class EventReader:
    """Turns an SSE body into ``(event, data)`` pairs; ``event`` is ``"message"`` unless the stream named it.

    Comments (``:`` lines) and ``id:``/``retry:`` fields are ignored; multi-line data is joined with
    ``\\n``; a stream that ends without a blank line still completes its last event (:meth:`end`).

    Args:
        max_event_bytes: The most one event's data (or one line) may hold.
    """

    __slots__ = ("_after_cr", "_data", "_event", "_head", "_line", "_size", "max_event_bytes")

    def __init__(self, max_event_bytes: int) -> None:
        self.max_event_bytes = max_event_bytes
        self._line = bytearray()  # the unterminated end of what was fed
        self._after_cr = False  # the last chunk ended with "\r": a "\n" starting the next is its pair
        self._event = "message"
        self._data: list[bytes] = []
        self._size = 0
        self._head: bytes | None = b""  # the stream's first bytes while they may be a BOM; then None

    def too_large(self) -> BadResponse:
        return BadResponse(f"an event of the upstream's stream is larger than {self.max_event_bytes} bytes")

    def feed(self, data: bytes) -> list[Event]:
        """The events that ``data`` completes.

        Raises:
            BadResponse: an event (or a line) passed ``max_event_bytes``, or its data is not UTF-8.
        """
        if self._head is not None:
            data = self._head + data
            if len(data) < len(BOM) and BOM.startswith(data):
                self._head = data
                return []
            self._head = None
            data = data.removeprefix(BOM)
        if self._after_cr:
            self._after_cr = False
            if data[:1] == b"\n":
                data = data[1:]
        cut = max(data.rfind(b"\n"), data.rfind(b"\r"))
        if cut < 0:  # no line ends here: keep the bytes (bytearray: no quadratic copying)
            self._line += data
            if _size(self._line) > self.max_event_bytes:
                raise self.too_large()
            return []
        if self._line:
            complete = bytes(self._line) + data[: cut + 1]
            self._line.clear()
        else:
            complete = data[: cut + 1]
        self._line += data[cut + 1 :]
        if _size(self._line) > self.max_event_bytes:
            raise self.too_large()
        self._after_cr = complete.endswith(b"\r")
        return self._lines(complete.splitlines())

    def end(self) -> list[Event]:
        """The events completed by the end of the body (a last line, then its event, without a blank
        line).

        Raises:
            BadResponse: as :meth:`feed`.
        """
        if self._head:  # the body ended inside what could have been a BOM: they are the stream's bytes
            self._line += self._head
        self._head = None
        lines = [bytes(self._line), b""] if self._line else [b""]
        self._line.clear()
        return self._lines(lines)

    def _lines(self, lines: list[bytes]) -> list[Event]:
        events: list[Event] = []
        limit = self.max_event_bytes
        for line in lines:
            if not line:
                if self._data:
                    events.append((self._event, _text(b"\n".join(self._data))))
                self._event, self._data, self._size = "message", [], 0
                continue
            if _size(line) > limit:
                raise self.too_large()
            if line[0] == 58:  # b":": a comment
                continue
            field, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                self._size += len(value) + (1 if self._data else 0)  # a newline joins it to the last
                if self._size > limit:
                    raise self.too_large()
                self._data.append(value)
            elif field == b"event":
                self._event = _text(value)
        return events


def _size(line: bytes | bytearray) -> int:
    """The bytes of a line (or the start of one) that count against the cap: a data line's value, any
    other line whole."""
    if line.startswith(b"data: "):
        return len(line) - 6
    if line.startswith(b"data:"):
        return len(line) - 5
    return len(line)


def _text(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise BadResponse(f"the upstream's stream is not UTF-8 (at byte {exc.start} of an event)") from exc
