"""An HTTP backend's connection policy, and the transport that serves it.

:class:`HTTPSettings` is the ``[lms.NAME.http]`` table of the HTTP providers. Its ``clients`` method
builds the client the backend posts through: the lean transport (h11 on Trio, ``_client``) unless
:func:`~._choice.choose` says httpx (``_httpx``) is needed for the URL (a proxy, HTTP/2). Nothing outside
this package decides between them.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import httpx

from ..._validate import optional_positive, positive, positive_int
from .._body import MAX_EVENT_BYTES, MAX_RESPONSE_BYTES
from .._redact import Redactor
from ._choice import TransportName, choose, proxy_for
from ._client import LeanClient
from ._connection import Timeouts
from ._httpx import REQUEST_HEADERS, ClientShards
from ._network import NetworkBackend
from ._protocol import HTTPClient
from ._tls import default_ssl_context, new_ssl_context


@attrs.frozen
class HTTPSettings:
    """Connection policy of an HTTP backend.

    Attributes:
        connect_timeout: Seconds to open a connection.
        read_timeout: Seconds the provider may stay silent between two reads (per attempt).
        write_timeout: Seconds to send the request.
        pool_timeout: Seconds to wait for a free pooled connection.
        max_connections: Concurrent connections to the provider.
        idle_check_interval: Seconds between checks for kept-alive connections the provider closed,
            which the backend's ``maintain`` task then closes too (None: never check).
        idle_timeout: Seconds an idle keep-alive connection is kept.
        client: ``"lean"`` (h11 on Trio streams), ``"httpx"``, or ``"auto"``: lean unless an HTTP
            proxy from the environment applies to the URL or ``http2`` is asked for.
        http2: Speak HTTP/2 (through httpx; needs the ``h2`` package).
        max_response_bytes: The most bytes one answer may have, decoded: a JSON body, or a whole
            event stream (16 MiB). A larger answer fails the call with ``UpstreamResponseError``.
        max_event_bytes: The most one event of a stream (or one line of it) may hold (1 MiB).
    """

    connect_timeout: float = attrs.field(default=10.0, validator=positive)
    read_timeout: float = attrs.field(default=120.0, validator=positive)
    write_timeout: float = attrs.field(default=30.0, validator=positive)
    pool_timeout: float = attrs.field(default=30.0, validator=positive)
    max_connections: int = attrs.field(default=1024, validator=positive_int)
    idle_check_interval: float | None = attrs.field(default=1.0, validator=optional_positive)
    idle_timeout: float = attrs.field(default=5.0, validator=positive)
    client: TransportName = attrs.field(
        default="auto", validator=attrs.validators.in_(("auto", "lean", "httpx"))
    )
    http2: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    max_response_bytes: int = attrs.field(default=MAX_RESPONSE_BYTES, validator=positive_int)
    max_event_bytes: int = attrs.field(default=MAX_EVENT_BYTES, validator=positive_int)

    def httpx_timeout(self) -> httpx.Timeout:
        """These timeouts as httpx's."""
        return httpx.Timeout(
            connect=self.connect_timeout,
            read=self.read_timeout,
            write=self.write_timeout,
            pool=self.pool_timeout,
        )

    def _lean_timeouts(self) -> Timeouts:
        return Timeouts(
            connect=self.connect_timeout,
            read=self.read_timeout,
            write=self.write_timeout,
            pool=self.pool_timeout,
        )

    def clients(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        network: NetworkBackend | None = None,
    ) -> HTTPClient:
        """A client with these timeouts and limits (no I/O happens until first use): the lean transport,
        or httpx shards where :func:`choose` says so.

        Args:
            transport: Send every request through this httpx transport instead of the network (tests
                pass an ``httpx.MockTransport``); one httpx client then serves all calls.
            network: Open the lean transport's connections here instead of on the real network (tests
                pass a ``MockBackend``); the lean transport then serves all calls, whatever ``client``
                says.
        """
        timeout = self.httpx_timeout()
        redact = Redactor.for_headers(headers)
        sent = {**REQUEST_HEADERS, **headers}
        if transport is not None:
            given = transport
            return ClientShards(
                1,
                lambda _: (
                    httpx.AsyncClient(base_url=base_url, headers=sent, timeout=timeout, transport=given),
                    given,
                ),
                redact=redact,
                max_response_bytes=self.max_response_bytes,
                max_event_bytes=self.max_event_bytes,
            )
        if network is not None or choose(base_url, self.client, http2=self.http2) == "lean":
            return LeanClient(
                base_url,
                headers,
                timeouts=self._lean_timeouts(),
                max_connections=self.max_connections,
                idle_timeout=self.idle_timeout,
                max_response_bytes=self.max_response_bytes,
                max_event_bytes=self.max_event_bytes,
                network=network,
            )

        # Loading CA certificates takes ~50 ms: one context for all shards and lean clients.
        verify = new_ssl_context() if self.http2 else default_ssl_context()
        proxy = proxy_for(base_url)

        def make_client(connections: int) -> tuple[httpx.AsyncClient, httpx.AsyncBaseTransport]:
            limits = httpx.Limits(
                max_connections=connections,
                max_keepalive_connections=connections,
                keepalive_expiry=self.idle_timeout,
            )
            # Our own transport (for reaping) means httpx applies no proxy from the environment itself.
            own = httpx.AsyncHTTPTransport(verify=verify, limits=limits, http2=self.http2, proxy=proxy)
            client = httpx.AsyncClient(base_url=base_url, headers=sent, timeout=timeout, transport=own)
            return client, own

        return ClientShards(
            self.max_connections,
            make_client,
            redact=redact,
            max_response_bytes=self.max_response_bytes,
            max_event_bytes=self.max_event_bytes,
        )
