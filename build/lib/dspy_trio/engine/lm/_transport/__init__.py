"""A lean HTTP/1.1 transport for the LM backends: h11 over Trio streams, a keep-alive pool per origin.

The backends call ``post_json`` / ``post_sse`` on a :class:`LeanClient` (or, where :func:`choose` says so,
on httpx shards with the same two methods). See ``_client`` for the exchange, ``_pool`` for pooling and
reaping, ``_connection`` for timeouts and cancellation, ``_choice`` for when httpx is used instead.
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
from ._pool import Pool as Pool
from ._pool import PoolStatistics as PoolStatistics
from ._protocol import HTTPClient as HTTPClient
from ._protocol import JSONResponse as JSONResponse
from ._tls import default_ssl_context as default_ssl_context
from ._tls import new_ssl_context as new_ssl_context

__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "HTTPClient",
    "JSONResponse",
    "LeanClient",
    "Pool",
    "PoolStatistics",
    "PoolTimeout",
    "ReadError",
    "ReadTimeout",
    "RemoteProtocolError",
    "Response",
    "Timeouts",
    "TransportError",
    "TransportName",
    "TransportTimeout",
    "WriteError",
    "WriteTimeout",
    "choose",
    "default_ssl_context",
    "new_ssl_context",
    "proxy_for",
]
