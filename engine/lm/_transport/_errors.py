"""The lean transport's own failures, translated to the engine's error tree at one edge (``_client``).

Each docstring says when you get it. Timeouts are a separate branch so that the edge can tell "no answer
in time" from "the connection broke".
"""

from __future__ import annotations


class TransportError(Exception):
    """Base of every failure of the lean HTTP/1.1 transport."""


class TransportTimeout(TransportError):
    """A phase of the exchange took longer than its configured timeout."""


class ConnectTimeout(TransportTimeout):
    """Opening the TCP connection (and TLS handshake) took longer than ``connect`` seconds."""


class WriteTimeout(TransportTimeout):
    """Sending the request took longer than ``write`` seconds (the peer stopped reading)."""


class ReadTimeout(TransportTimeout):
    """The peer sent nothing for ``read`` seconds while a response was awaited."""


class PoolTimeout(TransportTimeout):
    """No pooled connection became free within ``pool`` seconds (all ``max_connections`` were busy)."""


class ConnectError(TransportError):
    """The connection could not be opened: refused, unreachable, DNS failure, TLS verification failed."""


class WriteError(TransportError):
    """The connection broke while the request was being sent."""


class ReadError(TransportError):
    """The connection broke while the response was being read."""


class RemoteProtocolError(TransportError):
    """The peer broke HTTP/1.1: a malformed response, or it closed the connection mid-response."""
