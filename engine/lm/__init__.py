"""LM backends: ``dspy.BaseLM`` subclasses whose ``acall`` is Trio-native."""

from ._base import ChunkSink as ChunkSink
from ._base import Completion as Completion
from ._base import DeltaSink as DeltaSink
from ._base import GuardedLM as GuardedLM
from ._base import TrioLM as TrioLM
from ._transport import HTTPSettings as HTTPSettings
from .anthropic import AnthropicLM as AnthropicLM
from .openai import OpenAICompatibleLM as OpenAICompatibleLM
from .simulated import SimulatedLM as SimulatedLM
from .threaded import ThreadedLM as ThreadedLM

__all__ = [
    "AnthropicLM",
    "ChunkSink",
    "Completion",
    "DeltaSink",
    "GuardedLM",
    "HTTPSettings",
    "OpenAICompatibleLM",
    "SimulatedLM",
    "ThreadedLM",
    "TrioLM",
]
