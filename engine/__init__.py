"""dspy-trio's engine: DSPy programs run natively under Trio, with admission control and real cancellation.

::

    from engine import EngineConfig, open_engine

    async with open_engine(EngineConfig.from_env()) as engine:
        result = await engine.predict("default", {"question": "What is Trio?"})
        print(result.outputs["answer"], result.usage, result.timings)

This module is the public API; everything else is private unless re-exported here.
"""

import os as _os

# LiteLLM (used by stock dspy.LM) fetches a model cost map over the network on first use unless told
# not to; a server must not block on that. Set before anything imports it.
_os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from ._admission import AdmissionStatistics as AdmissionStatistics  # noqa: E402
from ._config import EngineConfig as EngineConfig  # noqa: E402
from ._config import LMConfig as LMConfig  # noqa: E402
from ._config import ProgramSpec as ProgramSpec  # noqa: E402
from ._engine import Engine as Engine  # noqa: E402
from ._engine import open_engine as open_engine  # noqa: E402
from ._errors import ConfigError as ConfigError  # noqa: E402
from ._errors import DeadlineExceededError as DeadlineExceededError  # noqa: E402
from ._errors import EngineClosedError as EngineClosedError  # noqa: E402
from ._errors import EngineError as EngineError  # noqa: E402
from ._errors import InvalidInputError as InvalidInputError  # noqa: E402
from ._errors import OverloadedError as OverloadedError  # noqa: E402
from ._errors import ProgramError as ProgramError  # noqa: E402
from ._errors import UnknownProgramError as UnknownProgramError  # noqa: E402
from ._errors import UpstreamConnectionError as UpstreamConnectionError  # noqa: E402
from ._errors import UpstreamError as UpstreamError  # noqa: E402
from ._errors import UpstreamRateLimitedError as UpstreamRateLimitedError  # noqa: E402
from ._errors import UpstreamResponseError as UpstreamResponseError  # noqa: E402
from ._errors import UpstreamServerError as UpstreamServerError  # noqa: E402
from ._errors import UpstreamTimeoutError as UpstreamTimeoutError  # noqa: E402
from ._programs import InputField as InputField  # noqa: E402
from ._programs import ProgramInfo as ProgramInfo  # noqa: E402
from ._result import PredictionResult as PredictionResult  # noqa: E402
from ._result import Timings as Timings  # noqa: E402
from ._result import Usage as Usage  # noqa: E402
from ._statistics import EngineStatistics as EngineStatistics  # noqa: E402

__all__ = [
    "AdmissionStatistics",
    "ConfigError",
    "DeadlineExceededError",
    "Engine",
    "EngineClosedError",
    "EngineConfig",
    "EngineError",
    "EngineStatistics",
    "InputField",
    "InvalidInputError",
    "LMConfig",
    "OverloadedError",
    "PredictionResult",
    "ProgramError",
    "ProgramInfo",
    "ProgramSpec",
    "Timings",
    "UnknownProgramError",
    "UpstreamConnectionError",
    "UpstreamError",
    "UpstreamRateLimitedError",
    "UpstreamResponseError",
    "UpstreamServerError",
    "UpstreamTimeoutError",
    "Usage",
    "open_engine",
]
