"""The HTTP transports of the LM backends, and the choice between them.

The backends hold an :class:`HTTPSettings` and call ``post_json`` / ``post_sse`` on the client it builds:
the lean transport (h11 over Trio streams, a keep-alive pool per origin: :class:`LeanClient`) or, where
:func:`choose` says so, httpx shards with the same two methods (``_httpx``). See ``_choice`` for the choice,
``_settings`` for the policy that builds the client, ``_client`` for the exchange, ``_pool`` for pooling and
reaping, ``_connection`` for timeouts and cancellation, ``_network`` for the sockets under it and
``_memory`` for the in-memory network tests use.
"""

from ._choice import TransportName as TransportName
from ._choice import choose as choose
from ._choice import proxy_for as proxy_for
from ._client import LeanClient as LeanClient
from ._client import Response as Response
from ._connection import Timeouts as Timeouts
from ._errors import ConnectError as ConnectError
from ._errors import ConnectTimeout as ConnectTimeout
from ._errors import PoolTimeout as PoolTimeout
from ._errors import ReadError as ReadError
from ._errors import ReadTimeout as ReadTimeout
from ._errors import RemoteProtocolError as RemoteProtocolError
from ._errors import TransportError as TransportError
from ._errors import TransportTimeout as TransportTimeout
from ._errors import WriteError as WriteError
from ._errors import WriteTimeout as WriteTimeout
from ._httpx import ClientShards as ClientShards
from ._memory import EOF as EOF
from ._memory import MockBackend as MockBackend
from ._memory import MockRequest as MockRequest
from ._memory import MockStream as MockStream
from ._memory import Reply as Reply
from ._memory import http_response as http_response
from ._network import NetworkBackend as NetworkBackend
from ._network import NetworkStream as NetworkStream
from ._network import Origin as Origin
from ._network import SocketBackend as SocketBackend
from ._pool import Pool as Pool
from ._pool import PoolStatistics as PoolStatistics
from ._protocol import HTTPClient as HTTPClient
from ._protocol import JSONResponse as JSONResponse
from ._settings import HTTPSettings as HTTPSettings
from ._tls import default_ssl_context as default_ssl_context
from ._tls import new_ssl_context as new_ssl_context

__all__ = [
    "EOF",
    "ClientShards",
    "ConnectError",
    "ConnectTimeout",
    "HTTPClient",
    "HTTPSettings",
    "JSONResponse",
    "LeanClient",
    "MockBackend",
    "MockRequest",
    "MockStream",
    "NetworkBackend",
    "NetworkStream",
    "Origin",
    "Pool",
    "PoolStatistics",
    "PoolTimeout",
    "ReadError",
    "ReadTimeout",
    "RemoteProtocolError",
    "Reply",
    "Response",
    "SocketBackend",
    "Timeouts",
    "TransportError",
    "TransportName",
    "TransportTimeout",
    "WriteError",
    "WriteTimeout",
    "choose",
    "default_ssl_context",
    "http_response",
    "new_ssl_context",
    "proxy_for",
]
