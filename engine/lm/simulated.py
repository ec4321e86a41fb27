"""The built-in simulated LM: deterministic, paced on Trio's clock, and shaped like a real model.

It reads the output fields (and their types) from the system message DSPy's adapters write, and answers
in the same format the adapter asked for — ``[[ ## field ## ]]`` sections for ``ChatAdapter``, one JSON
object for ``JSONAdapter`` — so any signature parses. Text is derived from a hash of the prompt, so the
same question always gets the same answer, and the words are paced: the first token after
``first_token_delay`` seconds, each further token ``token_delay`` later. Every sleep is ``trio.sleep``, so
on ``trio.testing.MockClock`` a test can assert exact times.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import attrs
import trio

from .._validate import non_negative, positive_int
from ._base import Completion, DeltaSink, Message, TrioLM

_OUTPUT_FIELDS = re.compile(r"Your output fields are:\n((?:\d+\. .*\n?)+)")
_FIELD_LINE = re.compile(r"^\d+\. `(\w+)` \((.*)\):", re.MULTILINE)
_TOKEN = re.compile(r"\S+\s*|\s+")
_TEXT = (
    "trio structured concurrency cancels work cleanly while the engine streams tokens from the model "
    "every request owns one deadline and one outcome bounded channels keep memory flat under load "
    "nurseries own their tasks so nothing outlives its scope and the socket closes when the client leaves"
)
_WORDS = _TEXT.split(" ")


def _output_fields(messages: Sequence[Message]) -> list[tuple[str, str]]:
    for message in messages:
        content = message.get("content")
        if message.get("role") == "system" and isinstance(content, str):
            found = _OUTPUT_FIELDS.search(content)
            if found:
                return _FIELD_LINE.findall(found.group(1))
    return [("answer", "str")]


def _wants_json(messages: Sequence[Message]) -> bool:
    last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    content = last_user.get("content") if last_user else None
    return isinstance(content, str) and "Respond with a JSON object" in content


def _value_for(type_name: str, words: list[str]) -> Any:
    """A value that DSPy parses as ``type_name`` (``str``, ``int``, ``Literal['a', 'b']``, ...)."""
    if type_name.startswith("Literal["):
        options = re.findall(r"'([^']*)'|\"([^\"]*)\"|([\w.-]+)", type_name[len("Literal[") : -1])
        first = next((next(part for part in option if part) for option in options), "")
        return first
    simple = {"int": 42, "float": 0.5, "bool": True}
    if type_name in simple:
        return simple[type_name]
    if type_name.startswith(("list[", "List[")):
        return [" ".join(words[:3]), " ".join(words[3:6])]
    if type_name.startswith(("dict[", "Dict[")):
        return {}
    return " ".join(words)


@attrs.frozen
class SimulatedSettings:
    """The ``simulated`` provider's keys of an ``[lms.NAME]`` table: the pacing of the built-in LM.

    Attributes:
        first_token_delay: Seconds before the first token.
        token_delay: Seconds between tokens.
        words_per_field: Length of each generated free-text field.
    """

    provider: ClassVar[str] = "simulated"
    key_env: ClassVar[str | None] = None

    first_token_delay: float = attrs.field(default=0.05, validator=non_negative)
    token_delay: float = attrs.field(default=0.01, validator=non_negative)
    words_per_field: int = attrs.field(default=16, validator=positive_int)

    def build(self, model: str, params: Mapping[str, Any], *, cache: bool = False) -> SimulatedLM:
        """The simulated LM with this pacing and these default parameters."""
        return SimulatedLM(
            model,
            first_token_delay=self.first_token_delay,
            token_delay=self.token_delay,
            words_per_field=self.words_per_field,
            cache=cache,
            **params,
        )


class SimulatedLM(TrioLM):
    """A fake model for development, tests and benchmarks; needs no network.

    Args:
        model: The name reported in usage and logs.
        first_token_delay: Seconds before the first token.
        token_delay: Seconds between tokens.
        words_per_field: Length of each generated free-text field.
    """

    def __init__(
        self,
        model: str = "simulated/lm",
        *,
        first_token_delay: float = 0.05,
        token_delay: float = 0.01,
        words_per_field: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        self.first_token_delay = first_token_delay
        self.token_delay = token_delay
        self.words_per_field = words_per_field

    def render(self, messages: Sequence[Message]) -> str:
        """The full completion text this LM answers ``messages`` with."""
        digest = hashlib.sha256(json.dumps(list(messages), sort_keys=True, default=str).encode()).digest()
        values: dict[str, Any] = {}
        for index, (name, type_name) in enumerate(_output_fields(messages)):
            start = digest[index % len(digest)]
            words = [_WORDS[(start + i) % len(_WORDS)] for i in range(self.words_per_field)]
            values[name] = _value_for(type_name.strip(), words)
        if _wants_json(messages):
            return json.dumps(values)
        sections = [
            f"[[ ## {name} ## ]]\n{json.dumps(value) if not isinstance(value, str) else value}"
            for name, value in values.items()
        ]
        return "\n\n".join([*sections, "[[ ## completed ## ]]"])

    def tokens(self, text: str) -> list[str]:
        """Split ``text`` into the pieces the simulated stream delivers."""
        return _TOKEN.findall(text)

    def duration(self, n_tokens: int) -> float:
        """Seconds from the call to its last token."""
        return self.first_token_delay + max(0, n_tokens - 1) * self.token_delay

    async def complete(
        self, messages: Sequence[Message], params: Mapping[str, Any], sink: DeltaSink | None
    ) -> Completion:
        text = self.render(messages)
        tokens = self.tokens(text)
        if sink is None:
            await trio.sleep(self.duration(len(tokens)))
        else:
            for index, token in enumerate(tokens):
                await trio.sleep(self.first_token_delay if index == 0 else self.token_delay)
                await sink.send(token)
        prompt_chars = sum(len(str(m.get("content", ""))) for m in messages)
        usage = {
            "prompt_tokens": math.ceil(prompt_chars / 4),
            "completion_tokens": len(tokens),
            "total_tokens": math.ceil(prompt_chars / 4) + len(tokens),
        }
        n = int(params.get("n") or 1)
        return Completion([text] * n, usage)
