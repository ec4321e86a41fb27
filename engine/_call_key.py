"""What makes two LM calls identical: the key single-flight and the response cache share calls under.

Two calls are identical when they would send the same request: the same LM (the engine's name for the
upstream) and model, the same messages, and the same request parameters, including DSPy's ``rollout_id``
(distinct rollouts ask for distinct samples, as in DSPy's own cache). Credentials and transport settings
are left out, as DSPy leaves them out of its cache key. Under ``scope = "key"`` the caller's API key is
part of it too, so that two keys never share an answer or a call.

The key is a keyed BLAKE2b digest of all that (the key of the digest is the deployment's secret, as for
the owners' digests of cancels): neither an API key nor a prompt is ever stored or sent to Redis in the
clear, and a key seen in Redis cannot be tested against guessed prompts or API keys without the secret.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

# Never part of the key: credentials, where the request goes, how it travels, DSPy's own switches.
NOT_IN_KEY = frozenset(
    {
        "api_key",
        "api_base",
        "base_url",
        "headers",
        "extra_headers",
        "timeout",
        "request_timeout",
        "num_retries",
        "stream",
        "stream_options",
        "cache",
    }
)

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=repr)


def digest_secret(secret: str) -> bytes:
    """The key of the digests (BLAKE2b takes at most 64 bytes): the secret's own SHA-256 digest."""
    return hashlib.sha256(secret.encode()).digest()


def call_key(
    secret: bytes,
    lm: str,
    model: str,
    messages: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    *,
    scope: str,
    rollout_id: Any = None,
) -> str:
    """The hex digest that identifies one LM call (see the module docstring). Does no I/O.

    Args:
        secret: The key of the digest (:func:`digest_secret`).
        lm: The engine's name for the upstream LM.
        model: The model the call asks for.
        messages: The chat messages, as sent.
        params: The request parameters, as sent (keys in :data:`NOT_IN_KEY` are ignored).
        scope: Who may share the call: the caller's API key, or ``""`` for everyone.
        rollout_id: DSPy's rollout id of the call, if any.
    """
    shown = sorted((name, value) for name, value in params.items() if name not in NOT_IN_KEY)
    parts = [_encoder.encode([lm, model, shown, rollout_id, scope, len(messages)])]
    for message in messages:  # each field length-prefixed: no two different calls read alike
        parts.append(f"|{len(message)}")
        for name in sorted(message):
            value = message[name]
            text = value if type(value) is str else _encoder.encode(value)
            parts.append(f"|{len(name)}:{name}{len(text)}:{text}")
    data = "".join(parts).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, key=secret, digest_size=20).hexdigest()
