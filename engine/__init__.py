"""dspy-trio's engine: DSPy programs run natively under Trio, with admission control and real cancellation.

::

    from dspy_trio.engine import EngineConfig, open_engine

    async with open_engine(EngineConfig.from_env()) as engine:
        result = await engine.predict("default", {"question": "What is Trio?"})
        print(result.outputs["answer"], result.usage, result.timings)

This module is the public API; everything else is private unless re-exported here.
"""

import os as _os

# LiteLLM (used by stock dspy.LM) fetches a model cost map over the network on first use unless told
# not to; a server must not block on that. Set before anything imports it.
_os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from ._adaptive import AdaptiveSettings as AdaptiveSettings
from ._batch import BatchItem as BatchItem
from ._engine import Engine as Engine
from ._engine import open_engine as open_engine
from ._engine_config import EngineConfig as EngineConfig
from ._errors import ClusterUnavailableError as ClusterUnavailableError
from ._errors import ConfigError as ConfigError
from ._errors import DeadlineExceededError as DeadlineExceededError
from ._errors import EngineClosedError as EngineClosedError
from ._errors import EngineError as EngineError
from ._errors import InvalidInputError as InvalidInputError
from ._errors import OverloadedError as OverloadedError
from ._errors import ProgramError as ProgramError
from ._errors import RateLimitWaitError as RateLimitWaitError
from ._errors import RequestAbandonedError as RequestAbandonedError
from ._errors import RequestCancelledError as RequestCancelledError
from ._errors import SlowConsumerError as SlowConsumerError
from ._errors import UnknownProgramError as UnknownProgramError
from ._errors import UpstreamConnectionError as UpstreamConnectionError
from ._errors import UpstreamError as UpstreamError
from ._errors import UpstreamRateLimitedError as UpstreamRateLimitedError
from ._errors import UpstreamResponseError as UpstreamResponseError
from ._errors import UpstreamServerError as UpstreamServerError
from ._errors import UpstreamTimeoutError as UpstreamTimeoutError
from ._gc import GCSettings as GCSettings
from ._gc import tune_gc_for_serving as tune_gc_for_serving
from ._lm_config import CallTimeouts as CallTimeouts
from ._lm_config import LMConfig as LMConfig
from ._lm_config import RateLimit as RateLimit
from ._program_spec import ProgramSpec as ProgramSpec
from ._programs import InputField as InputField
from ._programs import OutputField as OutputField
from ._programs import ProgramInfo as ProgramInfo
from ._result import PredictionResult as PredictionResult
from ._result import Timings as Timings
from ._result import Usage as Usage
from ._retry import RetryPolicy as RetryPolicy
from ._statistics import EngineStatistics as EngineStatistics
from ._stream_events import ErrorEvent as ErrorEvent
from ._stream_events import FieldDelta as FieldDelta
from ._stream_events import FinalEvent as FinalEvent
from ._stream_events import StatusEvent as StatusEvent
from ._stream_events import StreamEvent as StreamEvent
from ._stream_options import StreamOptions as StreamOptions
from ._streaming import EventStream as EventStream
from ._upstream import UpstreamStatistics as UpstreamStatistics
from .lm import AnthropicSettings as AnthropicSettings
from .lm import DSPySettings as DSPySettings
from .lm import HTTPSettings as HTTPSettings
from .lm import OpenAISettings as OpenAISettings
from .lm import SimulatedSettings as SimulatedSettings

__all__ = [
    "AdaptiveSettings",
    "AnthropicSettings",
    "BatchItem",
    "CallTimeouts",
    "ClusterUnavailableError",
    "ConfigError",
    "DSPySettings",
    "DeadlineExceededError",
    "Engine",
    "EngineClosedError",
    "EngineConfig",
    "EngineError",
    "EngineStatistics",
    "ErrorEvent",
    "EventStream",
    "FieldDelta",
    "FinalEvent",
    "GCSettings",
    "HTTPSettings",
    "InputField",
    "InvalidInputError",
    "LMConfig",
    "OpenAISettings",
    "OutputField",
    "OverloadedError",
    "PredictionResult",
    "ProgramError",
    "ProgramInfo",
    "ProgramSpec",
    "RateLimit",
    "RateLimitWaitError",
    "RequestAbandonedError",
    "RequestCancelledError",
    "RetryPolicy",
    "SimulatedSettings",
    "SlowConsumerError",
    "StatusEvent",
    "StreamEvent",
    "StreamOptions",
    "Timings",
    "UnknownProgramError",
    "UpstreamConnectionError",
    "UpstreamError",
    "UpstreamRateLimitedError",
    "UpstreamResponseError",
    "UpstreamServerError",
    "UpstreamStatistics",
    "UpstreamTimeoutError",
    "Usage",
    "open_engine",
    "tune_gc_for_serving",
]
