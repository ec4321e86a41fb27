"""The TLS context of the HTTP transports: one per process, shared by the lean connections and httpx's
HTTP/1.1 clients.

Loading CA certificates takes ~50 ms, so it is done once per process, on the first ``https`` client
(httpx's HTTP/2 clients each get a new one: httpcore sets ALPN on the context it is given).
CAs come from ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set (as httpx honours them), else from certifi.
The context verifies certificates and host names (SNI is sent by ``trio.SSLStream``'s
``server_hostname``) and offers only ``http/1.1`` by ALPN.
"""

from __future__ import annotations

import functools
import os
import ssl

import certifi


def new_ssl_context() -> ssl.SSLContext:
    """A new verifying client context (for httpx's HTTP/2 clients: httpcore sets ALPN on the context it
    is given, so they must not share the lean transport's)."""
    cafile = os.environ.get("SSL_CERT_FILE") or None
    capath = os.environ.get("SSL_CERT_DIR") or None
    if cafile is None and capath is None:
        cafile = certifi.where()
    context = ssl.create_default_context(cafile=cafile, capath=capath)
    context.set_alpn_protocols(["http/1.1"])
    return context


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """The shared, verifying client context (built on first use)."""
    return new_ssl_context()
