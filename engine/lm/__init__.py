"""LM backends: ``dspy.BaseLM`` subclasses whose ``acall`` is Trio-native, and the settings each provider
owns (the provider's keys of an ``[lms.NAME]`` table, which build its backend)."""

from ._base import ChunkSink as ChunkSink
from ._base import Completion as Completion
from ._base import DeltaSink as DeltaSink
from ._base import GuardedLM as GuardedLM
from ._base import TrioLM as TrioLM
from ._provider import ProviderSettings as ProviderSettings
from ._transport import HTTPSettings as HTTPSettings
from .anthropic import AnthropicLM as AnthropicLM
from .anthropic import AnthropicSettings as AnthropicSettings
from .openai import OpenAICompatibleLM as OpenAICompatibleLM
from .openai import OpenAISettings as OpenAISettings
from .simulated import SimulatedLM as SimulatedLM
from .simulated import SimulatedSettings as SimulatedSettings
from .threaded import DSPySettings as DSPySettings
from .threaded import ThreadedLM as ThreadedLM

__all__ = [
    "AnthropicLM",
    "AnthropicSettings",
    "ChunkSink",
    "Completion",
    "DSPySettings",
    "DeltaSink",
    "GuardedLM",
    "HTTPSettings",
    "OpenAICompatibleLM",
    "OpenAISettings",
    "ProviderSettings",
    "SimulatedLM",
    "SimulatedSettings",
    "ThreadedLM",
    "TrioLM",
]
