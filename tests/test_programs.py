"""Programs: every way to register one, and input checks against its fields."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import dspy
import pytest

from dspy_trio.engine import (
    ConfigError,
    EngineConfig,
    InvalidInputError,
    LMConfig,
    ProgramSpec,
    SimulatedSettings,
    open_engine,
)
from dspy_trio.engine._programs import build_program

FAST = LMConfig(settings=SimulatedSettings(first_token_delay=0, token_delay=0))


def engine_config(**programs: ProgramSpec) -> EngineConfig:
    return EngineConfig(lms={"default": FAST}, programs=programs)


async def test_signature_string_module_instance_and_import_paths() -> None:
    config = engine_config(
        default=ProgramSpec("question -> answer"),
        cot=ProgramSpec("question -> answer", module="chain_of_thought"),
        instance=ProgramSpec(dspy.Predict("topic -> summary")),
        signature_class=ProgramSpec("tests.sample_programs.qa:Classify"),
        module_object=ProgramSpec("tests.sample_programs.qa:two_step"),
        module_class=ProgramSpec("tests.sample_programs.qa:TwoStep", adapter="json"),
    )
    async with open_engine(config) as engine:
        infos = {info.name: info for info in engine.programs()}
        assert infos["cot"].outputs == ("reasoning", "answer")
        assert [(f.name, f.type, f.required) for f in infos["module_object"].inputs] == [
            ("question", "str", True),
            ("style", "str", False),
        ]
        assert (await engine.predict("cot", {"question": "q"})).outputs["reasoning"]
        assert (await engine.predict("instance", {"topic": "t"})).outputs["summary"]
        assert (await engine.predict("signature_class", {"text": "t", "count": 2})).outputs["label"]
        result = await engine.predict("module_object", {"question": "q", "style": "short"})
        assert result.outputs["answer"]
        assert result.usage.completion_tokens > 0, "usage of both predictors is summed"
        assert (await engine.predict("module_class", {"question": "q"})).outputs["answer"]


async def test_typed_inputs_are_validated_with_the_fields_type() -> None:
    async with open_engine(engine_config(c=ProgramSpec("tests.sample_programs.qa:Classify"))) as engine:
        with pytest.raises(InvalidInputError, match="'count' must be int") as info:
            await engine.predict("c", {"text": "t", "count": "many"})
        assert info.value.field == "count"


async def test_saved_program_directory_and_state_file(tmp_path: Path) -> None:
    program = dspy.Predict("question -> answer")
    program.demos = [dspy.Example(question="2+2?", answer="4")]
    program.save(str(tmp_path / "whole"), save_program=True)
    program.save(str(tmp_path / "state.json"))
    config = engine_config(
        whole=ProgramSpec(str(tmp_path / "whole"), allow_pickle=True),
        state=ProgramSpec("question -> answer", state=str(tmp_path / "state.json")),
    )
    async with open_engine(config) as engine:
        for name in ("whole", "state"):
            assert (await engine.predict(name, {"question": "3+3?"})).outputs["answer"]


@pytest.mark.parametrize(
    ("source", "extra", "message"),
    [
        ("nonsense", {}, "neither a signature"),
        ("no_such_module:thing", {}, "cannot import"),
        ("tests.sample_programs.qa:SyncOnly", {}, "has no aforward"),
        ("a -> b -> c", {}, "invalid signature"),
        (".", {}, "set allow_pickle = true"),
        ("question -> answer", {"state": "/no/such/file.json"}, "cannot load state"),
    ],
)
def test_programs_that_cannot_be_built_are_config_errors(
    source: str, extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        build_program("p", ProgramSpec(source, **extra))


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (
            'raise RuntimeError("the database is down")\n',
            "importing 'user_prog:program' raised RuntimeError: the da",
        ),
        ("def f(:\n", "importing 'user_prog:program' raised SyntaxError: "),
        (
            "import dspy\n\nclass Program(dspy.Module):\n"
            "    def __init__(self):\n        raise KeyError('k')\n\nprogram = Program\n",
            "'user_prog:program'() raised KeyError: 'k'",
        ),
    ],
)
def test_a_user_module_that_fails_is_a_config_error_naming_it(
    module: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user's own module raising when imported (or not compiling, or its Module class raising when
    built) is a ConfigError naming the program and the source, never the exception itself."""
    (tmp_path / "user_prog.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_prog", raising=False)
    with pytest.raises(ConfigError) as raised:
        build_program("p", ProgramSpec("user_prog:program"))
    assert f"program 'p': {message}" in str(raised.value)
