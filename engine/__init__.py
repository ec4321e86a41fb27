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
from ._breaker import BreakerSettings as BreakerSettings
from ._budget import BudgetLimit as BudgetLimit
from ._budget import Price as Price
from ._cache_config import CacheConfig as CacheConfig
from ._engine import Engine as Engine
from ._engine import open_engine as open_engine
from ._engine_config import EngineConfig as EngineConfig
from ._errors import BudgetExceededError as BudgetExceededError
from ._errors import CircuitOpenError as CircuitOpenError
from ._errors import ClusterUnavailableError as ClusterUnavailableError
from ._errors import ConfigError as ConfigError
from ._errors import DeadlineExceededError as DeadlineExceededError
from ._errors import DeadlineUnmeetableError as DeadlineUnmeetableError
from ._errors import EngineClosedError as EngineClosedError
from ._errors import EngineError as EngineError
from ._errors import InvalidInputError as InvalidInputError
from ._errors import OverloadedError as OverloadedError
from ._errors import ProgramError as ProgramError
from ._errors import RateLimitWaitError as RateLimitWaitError
from ._errors import RequestAbandonedError as RequestAbandonedError
from ._errors import RequestCancelledError as RequestCancelledError
from ._errors import SlowConsumerError as SlowConsumerError
from ._errors import TenantOverloadedError as TenantOverloadedError
from ._errors import TenantRateLimitedError as TenantRateLimitedError
from ._errors import UnknownProgramError as UnknownProgramError
from ._errors import UpstreamConnectionError as UpstreamConnectionError
from ._errors import UpstreamContextWindowError as UpstreamContextWindowError
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
from ._result import LMCall as LMCall
from ._result import PredictionResult as PredictionResult
from ._result import SkippedLM as SkippedLM
from ._result import Timings as Timings
from ._result import Usage as Usage
from ._retry import RetryPolicy as RetryPolicy
from ._sharing_statistics import SharingStatistics as SharingStatistics
from ._statistics import EngineStatistics as EngineStatistics
from ._stream_events import ErrorEvent as ErrorEvent
from ._stream_events import FieldDelta as FieldDelta
from ._stream_events import FinalEvent as FinalEvent
from ._stream_events import StatusEvent as StatusEvent
from ._stream_events import StreamEvent as StreamEvent
from ._stream_options import StreamOptions as StreamOptions
from ._streaming import EventStream as EventStream
from ._tenant_config import TenantConfig as TenantConfig
from ._tenants import TenantStatistics as TenantStatistics
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
    "BreakerSettings",
    "BudgetExceededError",
    "BudgetLimit",
    "CacheConfig",
    "CallTimeouts",
    "CircuitOpenError",
    "ClusterUnavailableError",
    "ConfigError",
    "DSPySettings",
    "DeadlineExceededError",
    "DeadlineUnmeetableError",
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
    "LMCall",
    "LMConfig",
    "OpenAISettings",
    "OutputField",
    "OverloadedError",
    "PredictionResult",
    "Price",
    "ProgramError",
    "ProgramInfo",
    "ProgramSpec",
    "RateLimit",
    "RateLimitWaitError",
    "RequestAbandonedError",
    "RequestCancelledError",
    "RetryPolicy",
    "SharingStatistics",
    "SimulatedSettings",
    "SkippedLM",
    "SlowConsumerError",
    "StatusEvent",
    "StreamEvent",
    "StreamOptions",
    "TenantConfig",
    "TenantOverloadedError",
    "TenantRateLimitedError",
    "TenantStatistics",
    "Timings",
    "UnknownProgramError",
    "UpstreamConnectionError",
    "UpstreamContextWindowError",
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
