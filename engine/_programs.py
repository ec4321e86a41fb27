"""Served programs: building them from specs, describing their fields, and checking inputs.

A program is any ``dspy.Module`` the engine can await natively (``Predict``, ``ChainOfThought``, or a
custom module with an ``aforward``). Inputs are checked before admission, so a bad request never takes
a slot: missing and unknown fields, and values that do not fit a field's type, are rejected with an
:class:`InvalidInputError` naming the field.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import pydantic

from ._dspy import ChainOfThought, History, Module, Predict, Signature, ensure_signature, load_program
from ._errors import ConfigError, InvalidInputError, UnknownProgramError
from ._program_spec import AdapterName, ProgramSpec

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@attrs.frozen
class InputField:
    """One input a program accepts.

    Attributes:
        name: The field name.
        type: The annotation's readable name (``str``, ``list[str]``, ...).
        required: Whether a request must give it.
        description: The field's ``desc`` in its signature ("" when it has none).
        history: Whether it takes a conversation's earlier turns (a ``dspy.History``).
    """

    name: str
    type: str
    required: bool
    adapter: pydantic.TypeAdapter[Any] | None = attrs.field(default=None, repr=False, eq=False)
    description: str = ""
    history: bool = False

    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema of the values the field takes (``{}``: any value)."""
        return _json_schema(self.type, self.adapter, self.description)


@attrs.frozen
class OutputField:
    """One output a program produces.

    Attributes:
        name: The field name.
        type: The annotation's readable name (``str``, ``int``, ``list[str]``, ...).
        description: The field's ``desc`` in its signature ("" when it has none).
    """

    name: str
    type: str
    description: str = ""
    adapter: pydantic.TypeAdapter[Any] | None = attrs.field(default=None, repr=False, eq=False)

    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema of the field's values (``{}``: any value)."""
        return _json_schema(self.type, self.adapter, self.description)


@attrs.frozen
class ProgramInfo:
    """A description of a served program, for listings.

    Attributes:
        name: Its registered name.
        kind: Its module's class (``Predict``, ``ChainOfThought``, ...).
        lm: The name of the LM it calls.
        inputs: The fields it takes.
        outputs: The names of the fields it produces, in order.
        description: What it does: the docstring of its (last predictor's) signature, or of its module.
        output_fields: The fields it produces, with their types (the same order as ``outputs``).
        predictor: The name of the predictor whose output fields are the program's outputs (its last;
            what :attr:`FieldDelta.predictor` says of its deltas), "" when it has none.
    """

    name: str
    kind: str
    lm: str
    inputs: tuple[InputField, ...]
    outputs: tuple[str, ...]
    description: str = ""
    output_fields: tuple[OutputField, ...] = ()
    predictor: str = ""

    @property
    def history(self) -> InputField | None:
        """The input that takes a conversation's earlier turns (a ``dspy.History``), if it has one."""
        return next((field for field in self.inputs if field.history), None)

    def input_schema(self) -> dict[str, Any]:
        """The JSON Schema of an object of its inputs."""
        return _object_schema({field.name: field.json_schema() for field in self.inputs}, self.inputs)

    def output_schema(self) -> dict[str, Any]:
        """The JSON Schema of an object of its outputs (every output is always there)."""
        return _object_schema({field.name: field.json_schema() for field in self.output_fields}, None)


@attrs.frozen
class Program:
    """A built program, ready to run.

    Attributes:
        name: Its registered name.
        module: The ``dspy.Module`` that runs.
        lm: The name of the LM it calls.
        adapter: ``chat`` or ``json``, or None for the engine default.
        info: Its fields, for validation and listings.
        open_inputs: Whether it also accepts fields it does not declare (``**kwargs`` modules).
    """

    name: str
    module: Module
    lm: str
    adapter: AdapterName | None
    info: ProgramInfo
    open_inputs: bool = False

    def validate(self, inputs: object) -> dict[str, Any]:
        """Check ``inputs`` against the program's input fields and return the values to call it with.

        Raises:
            InvalidInputError: naming the first field that is missing, unknown or of the wrong type.
        """
        if not isinstance(inputs, Mapping):
            raise InvalidInputError(f"inputs must be an object of fields, not {type(inputs).__name__}")
        fields = {field.name: field for field in self.info.inputs}
        for name in inputs:
            if not isinstance(name, str):
                raise InvalidInputError(f"input field names must be strings, got {name!r}")
            if name not in fields and not self.open_inputs:
                raise InvalidInputError(
                    f"unknown input field {name!r}; {self.name!r} takes {_names(fields)}", field=name
                )
        values: dict[str, Any] = {}
        for field in fields.values():
            if field.name not in inputs:
                if field.required:
                    raise InvalidInputError(
                        f"missing input field {field.name!r}; {self.name!r} takes {_names(fields)}",
                        field=field.name,
                    )
                continue
            values[field.name] = _check(field, inputs[field.name])
        values.update({k: v for k, v in inputs.items() if k not in fields})
        return values


def _json_schema(
    type_name: str, adapter: pydantic.TypeAdapter[Any] | None, description: str
) -> dict[str, Any]:
    if type_name == "str":
        schema: dict[str, Any] = {"type": "string"}
    elif adapter is None:
        schema = {}
    else:
        try:
            schema = adapter.json_schema()
        except (pydantic.PydanticUserError, TypeError, ValueError):  # a type JSON Schema cannot describe
            schema = {}
        schema.pop("description", None)  # a model's docstring (dspy.History's is a page long)
        schema.pop("title", None)
    if description:
        schema["description"] = description
    return schema


def _object_schema(properties: dict[str, Any], inputs: tuple[InputField, ...] | None) -> dict[str, Any]:
    required = list(properties) if inputs is None else [field.name for field in inputs if field.required]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def _described(field: Any) -> str:
    """A signature field's ``desc``, unless it is DSPy's placeholder (``${name}``)."""
    extra = getattr(field, "json_schema_extra", None) or {}
    desc = extra.get("desc") if isinstance(extra, dict) else None
    return desc if isinstance(desc, str) and not desc.startswith("${") else ""


def _is_history(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, History)


def _names(fields: Mapping[str, InputField]) -> str:
    return ", ".join(f"{f.name} ({f.type}{'' if f.required else ', optional'})" for f in fields.values())


def _check(field: InputField, value: Any) -> Any:
    if field.type == "str" and not isinstance(value, str):
        raise InvalidInputError(
            f"input field {field.name!r} must be a string, got {type(value).__name__}", field=field.name
        )
    if field.adapter is None:
        return value
    try:
        return field.adapter.validate_python(value)
    except pydantic.ValidationError as exc:
        problem = exc.errors()[0].get("msg", "invalid value") if exc.errors() else "invalid value"
        raise InvalidInputError(
            f"input field {field.name!r} must be {field.type}: {problem}", field=field.name
        ) from exc


def _type_name(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return "any"
    if isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _type_adapter(annotation: Any) -> pydantic.TypeAdapter[Any] | None:
    if annotation in (inspect.Parameter.empty, Any, str):
        return None
    try:
        return pydantic.TypeAdapter(annotation)
    except (pydantic.PydanticSchemaGenerationError, TypeError, ValueError):
        return None  # an annotation pydantic cannot check: pass values through unchecked


def _signature_of(module: Module) -> type[Signature] | None:
    """The signature whose input fields a built-in single-predictor module takes, if it is one."""
    if isinstance(module, Predict):
        return module.signature  # type: ignore[no-any-return]
    if isinstance(module, ChainOfThought):
        return module.predict.signature  # type: ignore[no-any-return]
    return None


def _describe(name: str, module: Module, lm: str) -> tuple[ProgramInfo, bool]:
    if not callable(getattr(module, "aforward", None)):
        raise ConfigError(
            f"program {name!r} ({type(module).__name__}) has no aforward(); the engine awaits programs "
            "natively under Trio, so custom modules must define `async def aforward(self, ...)`"
        )
    signature = _signature_of(module)
    if signature is not None:
        inputs = tuple(
            InputField(
                field_name,
                _type_name(field.annotation),
                field.is_required(),
                _type_adapter(field.annotation),
                _described(field),
                _is_history(field.annotation),
            )
            for field_name, field in signature.input_fields.items()
        )
        outputs = _output_fields(signature)
        info = ProgramInfo(
            name,
            type(module).__name__,
            lm,
            inputs,
            tuple(field.name for field in outputs),
            _docstring(signature.instructions),
            outputs,
            module.named_predictors()[-1][0],
        )
        return info, False

    parameters = list(inspect.signature(module.aforward).parameters.values())
    inputs = tuple(
        InputField(
            p.name,
            _type_name(p.annotation),
            p.default is inspect.Parameter.empty,
            _type_adapter(p.annotation),
        )
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )
    inputs = tuple(
        attrs.evolve(field, history=_is_history(p.annotation))
        for field, p in zip(
            inputs,
            (p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)),
            strict=True,
        )
    )
    open_inputs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    predictors = module.named_predictors()
    last = predictors[-1][1].signature if predictors else None
    outputs = _output_fields(last) if last is not None else ()
    description = _docstring(type(module).__doc__) or (_docstring(last.instructions) if last else "")
    info = ProgramInfo(
        name,
        type(module).__name__,
        lm,
        inputs,
        tuple(field.name for field in outputs),
        description,
        outputs,
        predictors[-1][0] if predictors else "",
    )
    return info, open_inputs


def _output_fields(signature: type[Signature]) -> tuple[OutputField, ...]:
    return tuple(
        OutputField(
            field_name,
            _type_name(field.annotation),
            _described(field),
            _type_adapter(field.annotation),
        )
        for field_name, field in signature.output_fields.items()
    )


def _docstring(text: str | None) -> str:
    return inspect.cleandoc(text) if text else ""


def _module_from_source(name: str, spec: ProgramSpec) -> Module:
    source = spec.source
    if isinstance(source, Module):
        return source
    if isinstance(source, type) and issubclass(source, Signature):
        return _from_signature(source, spec)
    if not isinstance(source, str):
        raise ConfigError(f"program {name!r}: unsupported source {source!r}")
    if "->" in source:
        try:
            return _from_signature(ensure_signature(source), spec)
        except (ValueError, SyntaxError, TypeError) as exc:
            raise ConfigError(f"program {name!r}: invalid signature {source!r}: {exc}") from exc
    if _IMPORT_PATH.match(source):
        return _from_import_path(name, source, spec)
    path = Path(source)
    if path.is_dir():
        if not spec.allow_pickle:
            raise ConfigError(
                f"program {name!r}: {source!r} is a saved-program directory, which DSPy loads with "
                "cloudpickle; set allow_pickle = true for trusted files"
            )
        try:
            loaded = load_program(str(path))
        except Exception as exc:
            raise ConfigError(f"program {name!r}: cannot load {source!r}: {exc}") from exc
        if not isinstance(loaded, Module):
            raise ConfigError(f"program {name!r}: {source!r} did not hold a dspy.Module")
        return loaded
    raise ConfigError(
        f"program {name!r}: {source!r} is neither a signature ('a, b -> c'), an import path "
        "('package.module:attribute') nor a saved-program directory"
    )


def _from_signature(signature: type[Signature], spec: ProgramSpec) -> Module:
    if spec.module == "chain_of_thought":
        return ChainOfThought(signature)
    return Predict(signature)


def _from_import_path(name: str, source: str, spec: ProgramSpec) -> Module:
    module_name, _, attribute = source.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"program {name!r}: cannot import {source!r}: {exc}") from exc
    except Exception as exc:  # the user's module failed while it ran (or did not compile)
        raise ConfigError(
            f"program {name!r}: importing {source!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(target, type) and issubclass(target, Signature):
        return _from_signature(target, spec)
    if isinstance(target, type) and issubclass(target, Module):
        try:
            target = target()
        except Exception as exc:
            raise ConfigError(f"program {name!r}: {source!r}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(target, Module):
        raise ConfigError(f"program {name!r}: {source!r} is not a dspy.Module or Signature")
    return target


def build_program(name: str, spec: ProgramSpec) -> Program:
    """Build the program ``spec`` describes. Does blocking work (imports, file reads): call at start-up.

    Raises:
        ConfigError: when the source cannot be built, loaded or awaited natively.
    """
    module = _module_from_source(name, spec)
    if spec.state is not None:
        try:
            module.load(spec.state)
        except Exception as exc:
            raise ConfigError(f"program {name!r}: cannot load state {spec.state!r}: {exc}") from exc
    info, open_inputs = _describe(name, module, spec.lm)
    return Program(name, module, spec.lm, spec.adapter, info, open_inputs)


class ProgramRegistry:
    """The programs an engine serves, by name."""

    def __init__(self, programs: Mapping[str, Program]) -> None:
        self._programs = dict(programs)

    @classmethod
    def build(cls, specs: Mapping[str, ProgramSpec]) -> ProgramRegistry:
        return cls({name: build_program(name, spec) for name, spec in specs.items()})

    def get(self, name: str) -> Program:
        """The program called ``name``.

        Raises:
            UnknownProgramError: if there is none.
        """
        try:
            return self._programs[name]
        except (KeyError, TypeError):
            raise UnknownProgramError(str(name), list(self._programs)) from None

    def infos(self) -> list[ProgramInfo]:
        return [program.info for program in self._programs.values()]
