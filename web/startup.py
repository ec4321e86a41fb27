"""What a process of the service sets up before it serves, light enough for every command line run:
logging with ISO 8601 UTC times, and the check that the address can be listened on.

The command line (``web/cli.py``) imports this, and the serving stack (``web/server.py``: the app,
Hypercorn, the MCP SDK, about a second of imports) only when it serves.
"""

from __future__ import annotations

import errno
import logging
import socket
import time


class UTCFormatter(logging.Formatter):
    """Log lines stamped with ISO 8601 UTC times (``2026-11-25T20:15:04.123Z``).

    With ``json_lines`` the message is taken to be a JSON object (the engine's request lines) and the time
    goes in as its first key, ``"ts"``, so each line stays one JSON object.
    """

    def __init__(self, fmt: str | None = None, *, json_lines: bool = False) -> None:
        super().__init__(fmt)
        self.json_lines = json_lines

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        if not self.json_lines:
            return super().format(record)
        message = record.getMessage()
        if not message.startswith("{"):
            return f"{self.formatTime(record)} {message}"
        rest = message[1:].lstrip()
        separator = "" if rest.startswith("}") else ","
        return f'{{"ts":"{self.formatTime(record)}"{separator}{rest}'


def configure_logging(level: int | str = logging.INFO) -> None:
    """Log to stderr with ISO 8601 UTC timestamps; request lines stay one JSON object per line.

    Idempotent: calling it again replaces the handlers it installed.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "dspy_trio", False)]:
        root.removeHandler(handler)
    plain = logging.StreamHandler()
    plain.setFormatter(UTCFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    plain.dspy_trio = True  # type: ignore[attr-defined]
    root.addHandler(plain)
    root.setLevel(level)
    json_lines = logging.StreamHandler()
    json_lines.setFormatter(UTCFormatter(json_lines=True))
    json_lines.dspy_trio = True  # type: ignore[attr-defined]
    # The engine's request lines, and the web layer's for requests it refused before the engine saw them.
    for name in ("dspy_trio.engine.requests", "dspy_trio.web.requests"):
        requests = logging.getLogger(name)
        for handler in [h for h in requests.handlers if getattr(h, "dspy_trio", False)]:
            requests.removeHandler(handler)
        requests.addHandler(json_lines)
        requests.propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)


class CannotListenError(Exception):
    """The address the service should listen on cannot be used (in use, not local, not allowed)."""


def check_can_listen(host: str, port: int) -> None:
    """Fail early, with one clear message, if ``host:port`` cannot be bound (port 0: if ``host`` cannot).

    Run it before starting anything, and before worker processes bind with ``SO_REUSEPORT`` (which would
    make the probe fail on their own sockets). Raises :class:`CannotListenError`.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CannotListenError(f"cannot listen on {host}:{port}: unknown host ({exc.strerror})") from exc
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Hypercorn binds
            try:
                probe.bind(address)
            except OSError as exc:
                reason = {
                    errno.EADDRINUSE: "the address is already in use (another server on that port?)",
                    errno.EADDRNOTAVAIL: "the address is not one of this machine's",
                    errno.EACCES: "permission denied (ports below 1024 need privileges)",
                }.get(exc.errno or 0, exc.strerror or str(exc))
                raise CannotListenError(f"cannot listen on {host}:{port}: {reason}") from exc


__all__ = ["CannotListenError", "UTCFormatter", "check_can_listen", "configure_logging"]
