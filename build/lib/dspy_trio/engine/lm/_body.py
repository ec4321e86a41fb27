"""An answer's body as the upstream meant it, from the bytes as they arrive: decoded, and bounded.

Both transports (the lean one in ``_transport``, and httpx read raw) pass every body chunk through a
:class:`BodyDecoder`, so one cap and one rule hold whichever carries the answer.

Inflating is where a hostile upstream multiplies memory: ~100 KB of gzip inflates to 100 MB. So a body is
inflated a piece at a time (``zlib``'s ``max_length``), each piece at most :data:`PIECE` bytes and never
more than one byte past the cap, which is checked before the next piece is made: memory stays within the
cap however large one compressed chunk is, and the caller yields to the scheduler between pieces, so one
chunk cannot hold the event loop while it inflates.

The transports ask for ``identity`` (``Accept-Encoding``). gzip and deflate are decoded all the same when
an upstream sends them unasked; any other coding (``br``, ``zstd``, ``compress``, or codings stacked on
one another) is refused: it could not be decoded within the same bound.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator


class BadResponse(Exception):
    """The exchange worked but the answer cannot be taken: it passed a size cap (the whole answer, or
    one event of a stream), its ``Content-Encoding`` cannot be decoded within the cap (or is corrupt or
    cut short), it is not UTF-8, or it is not the content type asked for. Either transport raises it
    while reading; their edges turn it into ``UpstreamResponseError`` (not retried: the same request
    would bring the same answer).

    The message is our own words, never the upstream's (it may repeat a content type or coding only
    from a fixed list of names), so clients may read it as it is.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.public = message


# The default caps (``HTTPSettings.max_response_bytes`` / ``max_event_bytes``). An LM's answer is
# kilobytes; a non-streamed one with logprobs for thousands of tokens a few megabytes. Parsing JSON
# multiplies memory (64 MiB of ``[],`` became 1.5 GB of lists in 10 s of one thread), so the cap on the
# whole answer is what bounds it; one event of a stream is one delta.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
MAX_EVENT_BYTES = 1024 * 1024
# The most a compressed body is inflated at a time (then the cap is checked and the loop may run).
PIECE = 64 * 1024

_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# Names an error message may repeat: the upstream chose the header's value, so anything else (which could
# quote a credential back) is not repeated to clients.
_KNOWN_CODINGS = frozenset({"br", "zstd", "compress", "x-compress", "dcb", "dcz"})
_KNOWN_TYPES = frozenset(
    {
        "text/html",
        "text/plain",
        "text/xml",
        "application/xml",
        "application/xhtml+xml",
        "application/octet-stream",
        "application/json",
        "application/x-ndjson",
        "text/event-stream",
    }
)


def content_coding(values: Iterable[str]) -> str | None:
    """The one coding to undo, from the ``Content-Encoding`` header values (None: the body is as sent).

    Raises:
        BadResponse: a coding that cannot be decoded within a bound, or more than one.
    """
    codings = [
        coding
        for value in values
        for part in value.split(",")
        if (coding := part.strip().lower()) not in ("", "identity")
    ]
    if not codings:
        return None
    if len(codings) > 1:
        raise BadResponse(
            "the upstream stacked Content-Encodings, which are not decoded (identity was asked)"
        )
    if codings[0] not in _WBITS:
        name = codings[0] if codings[0] in _KNOWN_CODINGS else "an unknown one"
        raise BadResponse(f"the upstream sent Content-Encoding {name}, which is not decoded")
    return codings[0]


def check_content_type(value: str | None, *, stream: bool) -> None:
    """Refuse a successful answer whose ``Content-Type`` is not what was asked for: an event stream
    must say ``text/event-stream``; a JSON answer may say nothing, else JSON (``application/json``,
    ``*/*+json``). An HTML page (a proxy's, a login wall's) is neither.

    Raises:
        BadResponse: naming the type received (never quoting the body).
    """
    media = (value or "").partition(";")[0].strip().lower()
    if stream:
        if media == "text/event-stream":
            return
    elif not media or media.endswith(("/json", "+json")):
        return
    wanted = "text/event-stream" if stream else "JSON"
    received = media if media in _KNOWN_TYPES else "another Content-Type" if media else "no Content-Type"
    raise BadResponse(f"the upstream answered with {received} where {wanted} was asked for")


class BodyDecoder:
    """Decodes one body, at most ``limit`` bytes of it.

    Feed each received chunk to :meth:`feed` and iterate the pieces it yields; call :meth:`end` once
    the body ended. While :attr:`more` is true after a piece, more pieces of the same chunk are coming:
    that is the moment to let the scheduler run.

    Args:
        coding: ``gzip``, ``x-gzip``, ``deflate`` (see :func:`content_coding`), or None for none.
        limit: The most bytes the body may have once decoded.
    """

    __slots__ = ("_inflater", "limit", "more", "size")

    def __init__(self, coding: str | None, limit: int) -> None:
        self._inflater = None if coding is None else zlib.decompressobj(_WBITS[coding])
        self.limit = limit
        self.size = 0
        self.more = False

    def too_large(self) -> BadResponse:
        return BadResponse(f"the upstream's answer is larger than {self.limit} bytes")

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decoded pieces of ``data``, each checked against the cap before it is made.

        Raises:
            BadResponse: the body passed the cap, or its compressed data is corrupt.
        """
        if self._inflater is None:
            self.size += len(data)
            if self.size > self.limit:
                raise self.too_large()
            yield data
            return
        yield from self._inflate(data)

    def _inflate(self, data: bytes) -> Iterator[bytes]:
        inflater = self._inflater
        assert inflater is not None
        if inflater.eof:
            if data:
                raise BadResponse("the upstream sent data after the end of its compressed answer")
            return
        while True:
            # One byte more than the cap allows, so an answer over it is seen without inflating more.
            wanted = min(PIECE, self.limit - self.size + 1)
            try:
                piece = inflater.decompress(data, wanted)
            except zlib.error as exc:
                raise BadResponse(f"the upstream's compressed answer is corrupt ({exc})") from exc
            data = inflater.unconsumed_tail
            self.size += len(piece)
            if self.size > self.limit:
                raise self.too_large()
            # Input left, or output held back (a full piece): another piece follows.
            self.more = bool(data) or len(piece) == wanted
            if inflater.eof and inflater.unused_data:
                raise BadResponse("the upstream sent data after the end of its compressed answer")
            if piece:
                yield piece
            if not self.more or inflater.eof:
                self.more = False
                return

    def end(self) -> None:
        """Check that a compressed body ended where its compressed data ends.

        Raises:
            BadResponse: the compressed data was cut short.
        """
        if self._inflater is not None and not self._inflater.eof:
            raise BadResponse("the upstream's compressed answer ended early")
