"""Schemathesis checks of the service's own promises (loaded by ``tests/test_web_schema_fuzz.py`` through
``SCHEMATHESIS_HOOKS``; self-contained, as Schemathesis loads it by its path).

- ``no_server_error``: no 5xx, ever; the one exception is a 504 ``deadline_exceeded`` answering a request
  whose own timeout (``timeout_secs``, OpenAI's ``timeout`` or ``X-Request-Timeout``) was under a second: the
  simulated LM answers in microseconds, but not in 5e-324 seconds.
- ``error_body_names_the_problem``: every 4xx is ``application/json`` in the service's error shape
  (``{"error": {"message", "type", "code", "param"}}``, OpenAI's), with a message; on ``/mcp`` the SDK's
  JSON-RPC errors (``{"jsonrpc": "2.0", "error": {"code": int, "message"}}``) too.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis

SHORT_TIMEOUT = 1.0


def _body(response: Any) -> Any:
    try:
        return json.loads(response.content)
    except ValueError:
        return None


def _own_timeout(request: Any) -> float | None:
    """The timeout the request itself asked for, if it asked for one."""
    header = request.headers.get("X-Request-Timeout")
    timeouts: list[Any] = [header] if header is not None else []
    try:
        body = json.loads(request.body or b"null")
    except ValueError:
        body = None
    if isinstance(body, dict):
        timeouts += [body.get("timeout_secs"), body.get("timeout")]
    for value in timeouts:
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None


@schemathesis.check
def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    if response.status_code < 500:
        return None
    body = _body(response)
    code = body.get("error", {}).get("code") if isinstance(body, dict) else None
    timeout = _own_timeout(response.request)
    if response.status_code == 504 and code == "deadline_exceeded" and (timeout or 1e9) < SHORT_TIMEOUT:
        return None
    raise AssertionError(f"server error {response.status_code}: {response.content[:500]!r}")


def _is_service_error(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and bool(error["message"].strip())
        and isinstance(error.get("type"), str)
        and isinstance(error.get("code"), str)
        and bool(error["code"])
        and (error.get("param") is None or isinstance(error.get("param"), str))
        and "param" in error
    )


def _is_json_rpc_error(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return (
        body.get("jsonrpc") == "2.0"
        and isinstance(error, dict)
        and isinstance(error.get("code"), int)
        and isinstance(error.get("message"), str)
        and bool(error["message"].strip())
    )


@schemathesis.check
def error_body_names_the_problem(ctx: Any, response: Any, case: Any) -> bool | None:
    if not 400 <= response.status_code < 500:
        return None
    media_type = response.headers.get("content-type", [""])[0]  # lower-case names, lists of values
    if media_type.split(";")[0].strip().lower() != "application/json":
        raise AssertionError(f"{response.status_code} as {media_type!r}: {response.content[:300]!r}")
    body = _body(response)
    if _is_service_error(body):
        return None
    if case.operation.path == "/mcp" and _is_json_rpc_error(body):
        return None
    raise AssertionError(f"{response.status_code} without an error naming it: {response.content[:300]!r}")
