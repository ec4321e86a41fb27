"""How to build one served program (``[programs.NAME]``), and the names of DSPy's adapters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

from ._tables import build, one_of

AdapterName = Literal["chat", "json"]
ModuleKind = Literal["predict", "chain_of_thought"]

ADAPTERS: tuple[AdapterName, ...] = ("chat", "json")


@attrs.frozen
class ProgramSpec:
    """How to build one served program.

    Attributes:
        source: A signature string (``"question -> answer"``), a ``dspy.Module`` instance, an import path
            ``"package.module:attribute"`` (a Module instance or class, or a Signature class), or the
            directory of a program saved with ``program.save(path, save_program=True)``.
        module: For signature sources: ``predict`` or ``chain_of_thought``.
        lm: The name of the LM (a key of ``EngineConfig.lms``) the program calls.
        adapter: ``chat`` or ``json``; None uses the engine's default.
        state: A JSON file written by ``program.save("x.json")`` to load into the built program.
        allow_pickle: Allow loading a saved-program directory (cloudpickle: trusted files only).
    """

    source: Any
    module: ModuleKind = attrs.field(default="predict", validator=one_of(("predict", "chain_of_thought")))
    lm: str = "default"
    adapter: AdapterName | None = attrs.field(
        default=None, validator=attrs.validators.optional(one_of(ADAPTERS))
    )
    state: str | None = None
    allow_pickle: bool = False

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str = "program") -> ProgramSpec:
        """Build from a TOML table."""
        return build(cls, data, where)
