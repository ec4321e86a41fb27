"""Test support shipped with the engine: a fake OpenAI-compatible upstream and pytest fixtures.

The pytest plugin (``engine.testing.pytest_plugin``) is registered through an entry point, so projects
that embed the engine get the ``fake_upstream`` and ``simulated_engine`` fixtures by installing dspy-trio.
"""

from .fake_upstream import Behavior as Behavior
from .fake_upstream import FakeUpstream as FakeUpstream
from .fake_upstream import Fault as Fault
from .fake_upstream import IdleClose as IdleClose
from .fake_upstream import RequestRecord as RequestRecord
from .fake_upstream import open_fake_upstream as open_fake_upstream

__all__ = ["Behavior", "FakeUpstream", "Fault", "IdleClose", "RequestRecord", "open_fake_upstream"]
