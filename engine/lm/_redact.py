"""Credentials out of the upstream's words before they reach the server's log.

An upstream may quote what it received — a 401 that says ``Incorrect API key provided: sk-...``, a
proxy's error page that dumps the request headers — so anything it wrote is redacted before it is logged
(clients never see it at all, see ``_http_errors``). A :class:`Redactor` removes:

- the credentials the backend sends (``Authorization``, ``x-api-key``, ...), wherever they appear, and
  any run of key-like characters sharing :data:`FRAGMENT` consecutive characters with one of them: a key
  cut in two (by a truncation, or split across two fields of the upstream's JSON) loses both halves.
  A credential's base64 forms (standard and URL-safe, at each of the three byte alignments it can take
  inside an encoded text: a gateway dumping ``Authorization``, a ``Basic user:key``) count as the
  credential;
- anything shaped like a credential: ``Bearer <token>``, ``Basic <token>``, ``sk-...`` keys, and the value
  of an ``api_key`` / ``x-api-key`` / ``authorization`` / ``token`` / ``secret`` / ``password`` field.

Redact first, cut afterwards (:meth:`Redactor.excerpt`): cutting first could leave half a key that no
longer matches. An excerpt is one log line: control characters are written as escapes.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping

REDACTED = "[redacted]"
# A configured credential this long or longer is also found by its fragments of this many characters.
FRAGMENT = 8

# Header names whose values are credentials.
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key"})
_RUN = re.compile(r"[A-Za-z0-9._~+/=\-]+")
_TRAILING_RUN = re.compile(r"[A-Za-z0-9._~+/=\-]+\Z")
# Control characters as escapes (``\n``, ``\x1b``) in an excerpt.
_CONTROLS = {c: repr(chr(c))[1:-1] for c in [*range(0x20), 0x7F]}
_SHAPES = (
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=\-]+"), rf"\1\2{REDACTED}"),
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}"), REDACTED),
    (
        re.compile(
            r"(?i)\b((?:x-)?api[-_]?key|authorization|access[-_]?token|token|secret|password)"
            r"(\\?[\"']?\s*[:=]\s*\\?[\"']?)(?!\[redacted\])[^\s\"',;&}<\\]+"
        ),
        rf"\1\2{REDACTED}",
    ),
)


def _base64_forms(secret: str) -> list[str]:
    """What every base64 encoding of a text containing ``secret`` contains, whatever surrounds it: for
    each alignment (0, 1 or 2 bytes before it in its 3-byte group) the characters made of its bits
    alone, in the standard and the URL-safe alphabet."""
    raw = secret.encode()
    forms = []
    for shift in range(3):
        encoded = base64.b64encode(bytes(shift) + raw).decode()
        # Character j holds bits [6j, 6j + 6); the secret's bits are [8 * shift, 8 * (shift + len)).
        core = encoded[-(-8 * shift // 6) : 8 * (shift + len(raw)) // 6]
        forms += [core, core.replace("+", "-").replace("/", "_")]
    return forms


class Redactor:
    """Removes ``secrets`` (and credential-shaped text) from text bound for the log.

    Args:
        secrets: The credentials to remove wherever they appear (empty ones are ignored).
    """

    __slots__ = ("_fragments", "_short", "_whole")

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        kept = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._whole = [s for s in kept if len(s) >= FRAGMENT]
        forms = [*self._whole, *(form for s in self._whole for form in _base64_forms(s))]
        # Lower-cased: an upstream that echoes a key upper-cased still echoes the key.
        self._fragments = {s[i : i + FRAGMENT].lower() for s in forms for i in range(len(s) - FRAGMENT + 1)}
        # A credential shorter than a fragment is removed only where it stands alone (a one-letter test
        # key must not blank every letter of the log).
        self._short = [
            re.compile(rf"(?<![A-Za-z0-9._~+/=\-]){re.escape(s)}(?![A-Za-z0-9._~+/=\-])")
            for s in kept
            if len(s) < FRAGMENT
        ]

    @classmethod
    def for_headers(cls, headers: Mapping[str, str]) -> Redactor:
        """A redactor for the credentials among request ``headers``: the whole value, and its token
        after a scheme (``Bearer <token>``)."""
        secrets: list[str] = []
        for name, value in headers.items():
            if name.lower() in _SECRET_HEADERS:
                secrets += [value.strip(), value.strip().partition(" ")[2].strip()]
        return cls(secrets)

    def __call__(self, text: str) -> str:
        for secret in self._whole:
            text = text.replace(secret, REDACTED)
        if self._fragments:
            text = _RUN.sub(self._run, text)
        for pattern in self._short:
            text = pattern.sub(REDACTED, text)
        for shape, replacement in _SHAPES:
            text = shape.sub(replacement, text)
        return text

    def _run(self, match: re.Match[str]) -> str:
        run = match.group()
        lowered = run.lower()
        if any(lowered[i : i + FRAGMENT] in self._fragments for i in range(len(run) - FRAGMENT + 1)):
            return REDACTED
        return run

    def excerpt(self, text: str, limit: int = 500) -> str:
        """``text`` redacted, then cut to ``limit`` characters (redacting a bounded window first, so a
        huge body costs little): what the log gets of an upstream's words."""
        window = text[: 4 * limit]
        cleaned = self(window).translate(_CONTROLS)  # one log line: no forged lines, no terminal codes
        if len(text) > len(window):  # the window may have cut a credential: drop its cut-off end
            cleaned = _TRAILING_RUN.sub("", cleaned)
        if len(cleaned) > limit or len(text) > len(window):
            return cleaned[:limit] + "..."
        return cleaned
