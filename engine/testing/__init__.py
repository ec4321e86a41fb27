"""Test support shipped with the engine: a fake OpenAI-compatible upstream and pytest fixtures.

The pytest plugin (``dspy_trio.engine.testing.pytest_plugin``) is opt-in: a project that embeds the
engine names it in its ``conftest.py`` or passes ``-p dspy_trio.engine.testing.pytest_plugin``, and gets
the ``fake_upstream``, ``simulated_engine`` and ``fake_upstream_engine`` fixtures.
"""

from .fake_upstream import Behavior as Behavior
from .fake_upstream import FakeUpstream as FakeUpstream
from .fake_upstream import Fault as Fault
from .fake_upstream import IdleClose as IdleClose
from .fake_upstream import RequestRecord as RequestRecord
from .fake_upstream import open_fake_upstream as open_fake_upstream

__all__ = ["Behavior", "FakeUpstream", "Fault", "IdleClose", "RequestRecord", "open_fake_upstream"]
