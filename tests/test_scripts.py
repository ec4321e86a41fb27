"""scripts/local-model.sh as a user reads and runs it (without building llama.cpp): it names only
variables dspy-trio reads, and what it prints points dspy-trio at the model the way README recommends."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from dspy_trio.engine import EngineConfig, OpenAISettings

from .helpers import variables_the_service_reads

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "local-model.sh"


def test_the_script_names_only_variables_the_service_reads() -> None:
    named = set(re.findall(r"\b((?:LM|DSPY_TRIO)_[A-Z_]+)=", SCRIPT.read_text()))
    assert {"LM_PROVIDER", "LM_API_BASE", "LM_MODEL", "LM_STREAM_UPSTREAM"} <= named
    assert named <= variables_the_service_reads(), named - variables_the_service_reads()


def test_what_env_prints_points_dspy_trio_at_the_model() -> None:
    printed = subprocess.run(
        ["bash", str(SCRIPT), "env", "8081"], capture_output=True, text=True, check=True
    ).stdout.split()
    env = dict(pair.split("=", 1) for pair in printed)
    assert set(env) <= variables_the_service_reads()
    config = EngineConfig.from_env(env)
    lm = config.lms["default"]
    settings = lm.settings
    assert isinstance(settings, OpenAISettings)
    assert (lm.provider, settings.api_base, lm.model) == ("openai", "http://127.0.0.1:8081/v1", "smollm2")
    assert settings.stream_upstream  # a cancelled predict stops llama.cpp's generation
    assert lm.params["max_tokens"] == 256
    assert config.adapter == "json"


def test_a_bad_port_is_one_line_and_exit_code_2() -> None:
    result = subprocess.run(
        ["bash", str(SCRIPT), "env", "99999"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stderr == "local-model: port must be a number from 0 to 65535, got '99999'\n"
