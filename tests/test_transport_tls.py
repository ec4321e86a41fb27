"""The lean transport over real TLS (a test CA from ``trustme``): verification, SNI, reuse, and the
upstream close on cancel."""

from __future__ import annotations

import ssl

import h11
import pytest
import trio
import trio.testing
import trustme

from dspy_trio.engine import UpstreamConnectionError
from dspy_trio.engine.lm._transport import ConnectError, LeanClient, default_ssl_context

from .helpers import CLOSE_MARGIN
from .transport_helpers import RawServer, json_response, keep_alive_handler, open_raw_server, read_request

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, *names: str) -> tuple[ssl.SSLContext, list[str | None]]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    seen: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: seen.append(name)
    return context, seen


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_https_round_trips_reuse_one_verified_connection_with_sni(ca: trustme.CA) -> None:
    context, sni = server_context(ca, "localhost")
    handler = keep_alive_handler(lambda request, body: json_response(b'{"over": "tls"}'))
    async with open_raw_server(handler, ssl_context=context) as server:
        client = LeanClient(f"https://localhost:{server.port}/v1", ssl_context=client_context(ca))
        for _ in range(3):
            assert (await client.post_json("m", "chat/completions", {})).json() == {"over": "tls"}
        assert server.connections == 1
        assert sni == ["localhost"]
        assert server.requests[0].target == b"/v1/chat/completions"
        assert (b"host", f"localhost:{server.port}".encode()) in list(server.requests[0].headers)
        client.close()


async def test_unknown_ca_is_refused(ca: trustme.CA) -> None:
    context, _ = server_context(ca, "localhost")
    handler = keep_alive_handler(lambda request, body: json_response())
    async with open_raw_server(handler, ssl_context=context) as server:
        client = LeanClient(f"https://localhost:{server.port}/v1")  # certifi's CAs only
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.request_json("x", b"{}")
        with pytest.raises(UpstreamConnectionError, match=r"could not connect to the upstream$"):
            await client.post_json("m", "x", {})
        assert client.pool.statistics().active == 0


async def test_certificate_for_another_host_is_refused(ca: trustme.CA) -> None:
    context, _ = server_context(ca, "example.org")
    handler = keep_alive_handler(lambda request, body: json_response())
    async with open_raw_server(handler, ssl_context=context) as server:
        client = LeanClient(f"https://localhost:{server.port}/v1", ssl_context=client_context(ca))
        with pytest.raises(ConnectError, match=r"match|mismatch"):
            await client.request_json("x", b"{}")


async def test_cancel_over_tls_closes_the_socket_at_once(ca: trustme.CA) -> None:
    context, _ = server_context(ca, "localhost")
    closed_at: list[float] = []

    async def hang(stream: trio.abc.Stream, server: RawServer) -> None:
        await read_request(stream, h11.Connection(h11.SERVER), server)
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        closed_at.append(trio.current_time())

    async with open_raw_server(hang, ssl_context=context) as server:
        client = LeanClient(f"https://localhost:{server.port}/v1", ssl_context=client_context(ca))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.request_json, "x", b"{}")
            await server.wait_for(lambda s: len(s.requests) == 1)
            cancelled_at = trio.current_time()
            nursery.cancel_scope.cancel()
        await server.wait_for(lambda s: s.closed == 1)
        assert closed_at[0] - cancelled_at < CLOSE_MARGIN
        assert client.pool.statistics().active == 0


def test_the_default_context_is_shared_and_verifies() -> None:
    context = default_ssl_context()
    assert context is default_ssl_context()
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
