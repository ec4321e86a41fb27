"""Credentials out of the upstream's words (engine/lm/_redact.py): the configured key wherever it is,
whole or in pieces, and anything shaped like a credential."""

from __future__ import annotations

import base64
import json

import pytest

from dspy_trio.engine.lm._http_errors import status_error
from dspy_trio.engine.lm._redact import REDACTED, Redactor

KEY = "sk-proj-Zq8vR2mK9tLw4XbN7cYp3HdF6gJs1AeU"


@pytest.fixture
def redact() -> Redactor:
    return Redactor.for_headers({"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})


def test_the_configured_key_is_removed_wherever_it_appears(redact: Redactor) -> None:
    for text in (
        f"Incorrect API key provided: {KEY}.",
        f"Authorization: Bearer {KEY}",
        f"<pre>authorization: bearer {KEY}</pre>",
        f"key={KEY}&x=1",
        f'{{"api_key": "{KEY}"}}',
    ):
        assert KEY not in redact(text)
        assert REDACTED in redact(text)


def test_half_a_key_is_removed_too(redact: Redactor) -> None:
    """A key cut by a truncation, or split across two fields of the upstream's JSON, loses both halves:
    any run sharing eight consecutive characters with the key goes."""
    first, second = KEY[:22], KEY[22:]
    text = json.dumps({"error": {"message": f"bad key {first}", "type": second}})
    cleaned = redact(text)
    assert first not in cleaned
    assert second not in cleaned
    assert redact(f"got: {KEY[5:17]}") == f"got: {REDACTED}"


def test_shapes_of_credentials_are_removed_without_knowing_them() -> None:
    redact = Redactor()
    cleaned = redact(
        "Bearer abc.def.ghi and sk-ant-api03-XYZxyz0123456789 then x-api-key: hunter2secret, "
        'password="p4ss" token=t0k3n'
    )
    for secret in ("abc.def.ghi", "sk-ant-api03", "hunter2secret", "p4ss", "t0k3n"):
        assert secret not in cleaned


def test_ordinary_words_survive() -> None:
    redact = Redactor(["k"])  # a one-letter test key blanks only where it stands alone
    text = "This model's maximum context length is 4097 tokens; max_tokens=5 keeps k"
    assert (
        redact(text) == f"This model's maximum context length is 4097 tokens; max_tokens=5 keeps {REDACTED}"
    )


def test_an_excerpt_is_redacted_before_it_is_cut(redact: Redactor) -> None:
    text = "x" * 490 + f" {KEY} " + "y" * 5000
    excerpt = redact.excerpt(text, limit=500)
    assert len(excerpt) <= 503
    assert not any(KEY[i : i + 8] in excerpt for i in range(len(KEY) - 7))
    window_cut = "z " * 999 + KEY  # the key straddles the end of the window redacted
    assert not any(KEY[i : i + 4] in redact.excerpt(window_cut, limit=2000) for i in range(len(KEY) - 3))


def test_json_escapes_do_not_hide_the_key(redact: Redactor, caplog: pytest.LogCaptureFixture) -> None:
    """The provider's words are redacted after its JSON is parsed: ``\\u0073k-...`` is the key."""
    escaped = "\\u0073" + KEY[1:]
    body = '{"error": {"message": "Incorrect API key provided: ' + escaped + '"}}'
    error = status_error("m", 401, {}, body, redact)
    assert KEY not in error.message
    assert "Incorrect" not in error.message
    assert "HTTP 401" in error.message
    assert KEY not in caplog.text
    assert "Incorrect API key provided: " + REDACTED in caplog.text


def test_a_key_echoed_in_another_case_is_removed_too(redact: Redactor) -> None:
    assert KEY.upper() not in redact(f"no such key: {KEY.upper()}")
    assert KEY.lower() not in redact(f"no such key: {KEY.lower()}")


def test_an_excerpt_is_one_log_line() -> None:
    """The upstream's words cannot forge log lines or send terminal escapes."""
    excerpt = Redactor().excerpt("bad\nINFO engine.requests forged line\r\x1b[31mred")
    assert not any(c in excerpt for c in "\n\r\x1b")
    assert excerpt == "bad\\nINFO engine.requests forged line\\r\\x1b[31mred"


@pytest.mark.parametrize("quoted", [KEY, f"Bearer {KEY}", f"user:{KEY}"], ids=["key", "header", "basic"])
@pytest.mark.parametrize("alphabet", ["standard", "urlsafe"])
def test_a_key_echoed_base64_encoded_is_removed(redact: Redactor, quoted: str, alphabet: str) -> None:
    """A gateway that dumps the request's ``Authorization`` base64-encoded (or a token built around the
    key) writes the key in another alphabet: decoding the log line gives it back. Every alignment of
    the key inside the encoded text must go, whatever precedes it."""
    encode = base64.b64encode if alphabet == "standard" else base64.urlsafe_b64encode
    encoded = encode(quoted.encode()).decode()
    logged = redact.excerpt(f"upstream said: invalid token {encoded} (check it)")
    assert encoded not in logged
    for run in logged.split():
        try:
            decoded = base64.b64decode(run + "==", altchars=b"-_" if alphabet == "urlsafe" else None)
        except ValueError:
            continue
        assert KEY[8:24].encode() not in decoded, logged
