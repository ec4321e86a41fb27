"""The lean transport's own failures, translated to the engine's error tree at one edge (``_client``).

Each docstring says when you get it. Timeouts are a separate branch so that the edge can tell "no answer
in time" from "the connection broke". (An answer that arrived whole but cannot be taken is not a
transport failure: it is ``dspy_trio.engine.lm._body.BadResponse``, shared with the httpx path.)

``public`` is what a client of the service may read about the failure: a fixed phrase. The exception's
own text can quote what the upstream sent (h11 quotes a malformed header line, and an upstream can echo
the request's credentials into one), so it goes only to the server's log, redacted.
"""

from __future__ import annotations


class TransportError(Exception):
    """Base of every failure of the lean HTTP/1.1 transport."""

    public = "the connection to the upstream failed"


class TransportTimeout(TransportError):
    """A phase of the exchange took longer than its configured timeout."""

    public = "the upstream did not answer in time"


class ConnectTimeout(TransportTimeout):
    """Opening the TCP connection (and TLS handshake) took longer than ``connect`` seconds."""

    public = "no connection to the upstream in time"


class WriteTimeout(TransportTimeout):
    """Sending the request took longer than ``write`` seconds (the peer stopped reading)."""

    public = "the upstream did not take the request in time"


class ReadTimeout(TransportTimeout):
    """The peer sent nothing for ``read`` seconds while a response was awaited."""

    public = "the upstream stayed silent past the read timeout"


class PoolTimeout(TransportTimeout):
    """No pooled connection became free within ``pool`` seconds (all ``max_connections`` were busy)."""

    public = "no free connection to the upstream in time"


class ConnectError(TransportError):
    """The connection could not be opened: refused, unreachable, DNS failure, TLS verification failed."""

    public = "could not connect to the upstream"


class WriteError(TransportError):
    """The connection broke while the request was being sent."""

    public = "the connection to the upstream broke while sending"


class ReadError(TransportError):
    """The connection broke while the response was being read."""

    public = "the connection to the upstream broke while reading"


class RemoteProtocolError(TransportError):
    """The peer broke HTTP/1.1: a malformed response, or it closed the connection mid-response."""

    public = "the upstream broke HTTP/1.1 or closed the connection mid-answer"
