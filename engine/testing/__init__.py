"""Test support shipped with the engine: a fake LM upstream (OpenAI-compatible and Anthropic), an
in-memory network for the HTTP backends' default transport, and pytest fixtures.

::

    backend = MockBackend(lambda request: [http_response(200, json={...})])
    lm = OpenAICompatibleLM("m", api_base="http://upstream.test/v1", network=backend)  # no socket

The pytest plugin (``dspy_trio.engine.testing.pytest_plugin``) is opt-in: a project that embeds the
engine names it in its ``conftest.py`` or passes ``-p dspy_trio.engine.testing.pytest_plugin``, and gets
the ``fake_upstream``, ``simulated_engine`` and ``fake_upstream_engine`` fixtures.
"""

from ..lm._transport import EOF as EOF
from ..lm._transport import MockBackend as MockBackend
from ..lm._transport import MockRequest as MockRequest
from ..lm._transport import Reply as Reply
from ..lm._transport import http_response as http_response
from ._faults import Behavior as Behavior
from ._faults import Fault as Fault
from ._records import IdleClose as IdleClose
from ._records import RequestRecord as RequestRecord
from .fake_upstream import FakeUpstream as FakeUpstream
from .fake_upstream import open_fake_upstream as open_fake_upstream

__all__ = [
    "EOF",
    "Behavior",
    "FakeUpstream",
    "Fault",
    "IdleClose",
    "MockBackend",
    "MockRequest",
    "Reply",
    "RequestRecord",
    "http_response",
    "open_fake_upstream",
]
