"""Keep-alive connections over raw sockets: an early answer never wedges the next request, a client's
``Connection: close`` is honoured, and idle connections are closed after the keep-alive timeout."""

from __future__ import annotations

import json

import h11
import httpx
import trio

from .web_helpers import running, settings


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def _read_response(
    stream: trio.SocketStream, conn: h11.Connection
) -> tuple[int, dict[str, str], bytes]:
    """One response parsed with h11 (client side)."""
    status, headers, body = 0, {}, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, body


async def _split_request(
    stream: trio.SocketStream, conn: h11.Connection, path: str, body: bytes, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    """Send the head and the body in separate TCP segments (as httpx and requests do), then read."""
    fields = [("Host", "x"), ("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    fields += [(name.replace("_", "-"), value) for name, value in headers.items()]
    await stream.send_all(conn.send(h11.Request(method="POST", target=path, headers=fields)) or b"")
    await trio.sleep(0.05)  # the app answers before the body arrives
    await stream.send_all((conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b""))
    response = await _read_response(stream, conn)
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
    return response


async def _closed_by_server(stream: trio.SocketStream) -> bool:
    try:
        return await stream.receive_some(65536) == b""
    except trio.BrokenResourceError:  # a reset is a close too
        return True


async def test_early_refusals_with_the_body_in_its_own_segment_keep_the_connection_usable() -> None:
    body = json.dumps({"question": "q"}).encode()
    async with running(settings(api_keys=("k",))) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        conn = h11.Connection(h11.CLIENT)
        async with stream:
            with trio.fail_after(10):
                for _ in range(3):
                    status, _, _ = await _split_request(stream, conn, "/predict", body)
                    assert status == 401
                assert (await _split_request(stream, conn, "/nowhere", body, Authorization="Bearer k"))[
                    0
                ] == 404
                assert (await _split_request(stream, conn, "/health", body, Authorization="Bearer k"))[
                    0
                ] == 405
                bad = await _split_request(stream, conn, "/predict", b"{not json", Authorization="Bearer k")
                assert bad[0] == 400
                good = await _split_request(stream, conn, "/predict", body, Authorization="Bearer k")
                assert good[0] == 200
                assert json.loads(good[2])["answer"]


async def test_httpx_gets_three_401s_in_a_row_then_an_answer_on_one_client() -> None:
    async with running(settings(api_keys=("k",))) as server, httpx.AsyncClient(base_url=server.url) as client:
        with trio.fail_after(10):
            for _ in range(3):  # a body big enough to go out in segments of its own
                assert (await client.post("/predict", json={"question": "q" * 60_000})).status_code == 401
            bad = await client.post(
                "/predict",
                content=b"{not json",
                headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
            )
            assert bad.status_code == 400
            good = await client.post(
                "/predict", json={"question": "q"}, headers={"Authorization": "Bearer k"}
            )
            assert good.status_code == 200


async def test_a_body_over_the_limit_is_answered_413_and_the_connection_closed() -> None:
    async with running(settings(max_body_bytes=1000)) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        conn = h11.Connection(h11.CLIENT)
        head = [("Host", "x"), ("Content-Type", "application/json"), ("Content-Length", "100000")]
        async with stream:
            with trio.fail_after(10):
                await stream.send_all(
                    conn.send(h11.Request(method="POST", target="/predict", headers=head)) or b""
                )
                status, headers, _ = await _read_response(stream, conn)
                assert status == 413
                assert headers.get("connection") == "close"
                assert await _closed_by_server(stream)


async def test_a_clients_connection_close_is_honoured() -> None:
    async with running() as server:
        stream = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        conn = h11.Connection(h11.CLIENT)
        body = json.dumps({"question": "q"}).encode()
        async with stream:
            with trio.fail_after(10):
                status, _, _ = await _split_request(stream, conn, "/predict", body, Connection="close")
                assert status == 200
                assert await _closed_by_server(stream)


async def test_idle_keep_alive_connections_are_closed_after_the_timeout() -> None:
    async with running(settings(keep_alive_timeout=0.5)) as server:
        idle = await trio.open_tcp_stream("127.0.0.1", _port(server.url))  # never sends anything
        used = await trio.open_tcp_stream("127.0.0.1", _port(server.url))
        conn = h11.Connection(h11.CLIENT)
        async with idle, used:
            with trio.fail_after(10):
                assert (await _split_request(used, conn, "/predict", json.dumps({"question": "q"}).encode()))[
                    0
                ] == 200
                # after an early refusal too (the case that used to lose its idle timer)
                assert (await _split_request(used, conn, "/nowhere", b"{}"))[0] == 404
                started = trio.current_time()
                assert await _closed_by_server(used)
                assert await _closed_by_server(idle)
        assert trio.current_time() - started < 5
