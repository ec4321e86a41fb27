"""The Host allow-list (web/hosts.py), the DNS rebinding defence: which names a server answers for, by
where it is bound, and what a request naming another host gets over a real socket."""

from __future__ import annotations

import json

import httpx
import pytest

from dspy_trio.web.hosts import AllowedHosts, host_name
from dspy_trio.web.settings import ServiceSettings

from .test_web_keepalive import _port
from .test_web_protocol import assert_refused, parse_responses, request, send_raw
from .web_helpers import running, settings


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (b"localhost:8000", b"localhost"),
        (b"LocalHost.", b"localhost"),
        (b"[::1]:8000", b"[::1]"),
        (b"127.0.0.1", b"127.0.0.1"),
        (b"Api.Example.com:443", b"api.example.com"),
    ],
)
def test_a_host_header_names_its_host_without_port_case_or_trailing_dot(value: bytes, name: bytes) -> None:
    assert host_name(value) == name


def test_a_server_on_loopback_answers_only_the_loopback_names_its_address_and_the_listed_ones() -> None:
    hosts = AllowedHosts.for_server(["127.0.0.2"], ["api.example.com", "::1"])
    assert hosts is not None
    for allowed in (b"localhost:1", b"127.0.0.1:1", b"[::1]:1", b"127.0.0.2:1", b"API.example.com"):
        assert hosts.allows(allowed), allowed
    for refused in (b"rebind.attacker.example:8000", b"127.0.0.3", b"localhost.attacker.example", b"[::1"):
        assert not hosts.allows(refused), refused
    assert AllowedHosts.for_server(["::1"]) is not None


def test_a_server_bound_elsewhere_answers_any_host_unless_names_are_listed() -> None:
    assert AllowedHosts.for_server(["0.0.0.0"]) is None
    assert AllowedHosts.for_server(["192.0.2.7"]) is None
    listed = AllowedHosts.for_server(["0.0.0.0"], ["api.example.com"])
    assert listed is not None
    assert listed.allows(b"api.example.com")
    assert listed.allows(b"localhost:8000")
    assert not listed.allows(b"0.0.0.0")
    assert not listed.allows(b"other.example")
    assert AllowedHosts.for_server(["127.0.0.1"], ["*"]) is None  # any Host, even on loopback


def test_the_allowed_hosts_come_from_the_environment() -> None:
    chosen = ServiceSettings.from_env({"DSPY_TRIO_ALLOWED_HOSTS": " api.example.com , localhost.lan "})
    assert chosen.allowed_hosts == ("api.example.com", "localhost.lan")
    assert ServiceSettings.from_env({}).allowed_hosts == ()


async def test_a_request_naming_another_host_gets_a_421_and_the_connection_closes() -> None:
    async with running(settings(allowed_hosts=("api.example.com",))) as server:
        port = _port(server.url)
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "api.example.com:443"):
            raw = await send_raw(port, request("GET", "/health", f"Host: {host}", "Connection: close"))
            assert parse_responses(raw)[0][0] == 200, host
        raw = await send_raw(
            port,
            request("GET", "/health", "Host: rebind.attacker.example"),
            request("GET", "/health", "Host: localhost"),  # never read: the connection closed
        )
        error = assert_refused(raw, 421, "host_not_allowed")
        assert "DSPY_TRIO_ALLOWED_HOSTS" in str(error["message"])
        async with httpx.AsyncClient(base_url=server.url) as client:  # Host: 127.0.0.1:PORT
            answer = await client.post("/predict", json={"question": "q"})
        assert answer.status_code == 200
        assert json.loads(answer.content)["answer"]


async def test_a_star_answers_any_host() -> None:
    async with running(settings(allowed_hosts=("*",))) as server:
        port = _port(server.url)
        raw = await send_raw(port, request("GET", "/health", "Host: anything.example", "Connection: close"))
    assert parse_responses(raw)[0][0] == 200
