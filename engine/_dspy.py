"""The engine's one seam to DSPy: every DSPy name the engine uses outside its LM backends lives here.

``tests/test_dspy_contract.py`` pins the behaviour this module relies on; when a DSPy upgrade breaks
that test, this module (and the backends in ``engine/lm/``) is what changes.

What is here: the program types the engine loads and inspects (``Module``, ``Predict``,
``ChainOfThought``, ``Signature``, ``load_program``, ``ensure_signature``), the adapters by name, the
per-request settings context with DSPy's usage tracker, the parse error and what a parse failure says
to a caller, the stream chunk type, and the settings, usage tracker and cache an LM call reads.

What stays elsewhere, and why: ``engine/lm/_base.py`` (``TrioLM``) subclasses ``dspy.BaseLM``, since
DSPy's adapters call ``lm.acall`` on whatever is in ``dspy.settings.lm``; ``engine/lm/threaded.py`` wraps
a stock ``dspy.LM`` (its reason to exist) and maps its error types. Both get their other DSPy names from
here.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import dspy
import dspy.adapters.utils as _adapter_utils
import pydantic
from dspy.clients.call_result import attributes
from dspy.clients.engines.streaming import EngineChunk
from dspy.signatures.signature import SignatureMeta, ensure_signature
from dspy.utils.exceptions import AdapterParseError
from dspy.utils.usage_tracker import UsageTracker

__all__ = [
    "AdapterParseError",
    "ChainOfThought",
    "Module",
    "Predict",
    "Signature",
    "UsageTracker",
    "adapter",
    "cache_get",
    "cache_put",
    "cache_signature_fields",
    "cache_type_adapters",
    "current_stream",
    "ensure_signature",
    "load_program",
    "parse_failure_message",
    "program_context",
    "report_usage",
    "stream_chunk",
]

Module = dspy.Module
Predict = dspy.Predict
ChainOfThought = dspy.ChainOfThought
Signature = dspy.Signature

_ADAPTER_TYPES: Mapping[str, type[Any]] = {"chat": dspy.ChatAdapter, "json": dspy.JSONAdapter}
_adapters: dict[str, Any] = {}

QUOTE_CHARS = 200  # how much of an unparsable reply a parse-failure message quotes


def adapter(name: str) -> Any:
    """The adapter called ``name`` (``chat`` or ``json``): one shared instance per name.

    DSPy's adapters keep no per-call state (``dspy.configure(adapter=...)`` shares one the same way), so
    building one per request is work for nothing.
    """
    instance = _adapters.get(name)
    if instance is None:
        instance = _adapters[name] = _ADAPTER_TYPES[name]()
    return instance


_TYPE_ADAPTERS: dict[tuple[Any, str], pydantic.TypeAdapter[Any]] = {}
_MAX_TYPE_ADAPTERS = 512  # types seen in signatures and input values; past it, build as DSPy does


def _cached_type_adapter(annotation: Any, *args: Any, **kwargs: Any) -> pydantic.TypeAdapter[Any]:
    """``pydantic.TypeAdapter(annotation)``, built once per annotation. The key holds the repr too:
    ``int | str == str | int``, but pydantic may treat the two orders differently."""
    if args or kwargs:
        return pydantic.TypeAdapter(annotation, *args, **kwargs)
    try:
        key = (annotation, repr(annotation))
        found = _TYPE_ADAPTERS.get(key)
    except TypeError:  # an unhashable annotation (e.g. Annotated with unhashable metadata)
        return pydantic.TypeAdapter(annotation)
    if found is None:
        found = pydantic.TypeAdapter(annotation)
        if len(_TYPE_ADAPTERS) < _MAX_TYPE_ADAPTERS:
            _TYPE_ADAPTERS[key] = found
    return found


def cache_type_adapters(enabled: bool = True) -> None:
    """Make DSPy's adapter helpers (``dspy.adapters.utils``: ``serialize_for_json``, ``parse_value``)
    reuse one pydantic ``TypeAdapter`` per type instead of building one per value (three per
    prediction of ``question -> answer``, ~30% of DSPy's CPU per prediction). A ``TypeAdapter`` is
    immutable once built, so the prompts and parsed values are the same (the contract test compares
    them byte for byte). ``open_engine`` turns it on; ``enabled=False`` restores DSPy's own."""
    _adapter_utils.TypeAdapter = _cached_type_adapter if enabled else pydantic.TypeAdapter


_STOCK_FIELDS_WITH_TYPE = SignatureMeta._get_fields_with_type
# Per signature class: the pydantic fields dict the split was made from, its input and output fields.
_SIGNATURE_FIELDS: weakref.WeakKeyDictionary[type, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)


def _cached_fields_with_type(cls: type, field_type: str) -> dict[str, Any]:
    """``SignatureMeta._get_fields_with_type``, split once per signature class. DSPy recomputes it on
    every ``input_fields``/``output_fields`` access (~24 times per prediction of ``question -> answer``).
    A signature's fields never change in place — DSPy's ``with_instructions``, ``append``, ``delete``,
    ``with_updated_fields`` build new classes, and pydantic's rebuild assigns a new fields dict, which
    invalidates the entry — and edits of a field's ``prefix``/``desc`` mutate the shared ``FieldInfo``
    objects, which the cached dicts hold too. Each call returns a new dict, as DSPy's does."""
    fields = getattr(cls, "__pydantic_fields__", None)  # what ``cls.model_fields`` returns, minus its wrapper
    if fields is None:
        return dict(_STOCK_FIELDS_WITH_TYPE(cls, field_type))
    cached = _SIGNATURE_FIELDS.get(cls)
    if cached is None or cached[0] is not fields or len(cached[1]) + len(cached[2]) != len(fields):
        split: dict[str, dict[str, Any]] = {"input": {}, "output": {}}
        for name, info in fields.items():
            kind = info.json_schema_extra["__dspy_field_type"]
            if kind not in split:  # not DSPy's own two kinds: leave it to DSPy
                return dict(_STOCK_FIELDS_WITH_TYPE(cls, field_type))
            split[kind][name] = info
        cached = (fields, split["input"], split["output"])
        _SIGNATURE_FIELDS[cls] = cached
    if field_type == "input":
        return dict(cached[1])
    if field_type == "output":
        return dict(cached[2])
    return dict(_STOCK_FIELDS_WITH_TYPE(cls, field_type))


def cache_signature_fields(enabled: bool = True) -> None:
    """Make DSPy's ``Signature.input_fields``/``output_fields`` split a signature's fields once per
    class instead of on every access (~10% of a prediction's CPU). The same fields, in the same order,
    so the prompts and parses are the same (the contract test compares them byte for byte).
    ``open_engine`` turns it on; ``enabled=False`` restores DSPy's own."""
    SignatureMeta._get_fields_with_type = _cached_fields_with_type if enabled else _STOCK_FIELDS_WITH_TYPE


def load_program(path: str) -> Any:
    """A program saved with ``dspy.save`` (a directory). Blocks on file reads."""
    return dspy.load(path, allow_pickle=True)


@contextmanager
def program_context(lm: Any, adapter_name: str, send_stream: Any) -> Iterator[UsageTracker]:
    """DSPy's settings for one request, in one context: its LM, its adapter, the stream router, no
    history or trace growth, and a fresh usage tracker (rolled up into an enclosing one on exit, as
    ``dspy.track_usage`` does). Yields the tracker."""
    tracker = UsageTracker()
    parent = dspy.settings.usage_tracker
    with dspy.context(
        lm=lm,
        adapter=adapter(adapter_name),
        send_stream=send_stream,
        usage_tracker=tracker,
        disable_history=True,
        max_trace_size=0,
        max_history_size=0,
    ):
        try:
            yield tracker
        finally:
            if parent is not None:
                for model, entries in tracker.usage_data.items():
                    parent.usage_data[model].extend(entries)


def current_stream() -> tuple[Any, int | None]:
    """Where the current DSPy call's stream chunks go (None when nobody streams it), and the id of the
    predictor making the call (how ``dspy.streaming`` routes chunks)."""
    settings = dspy.settings
    stream = settings.send_stream
    if stream is None:
        return None, None
    caller = settings.caller_predict
    return stream, id(caller) if caller is not None else None


def stream_chunk(model: str, predict_id: int | None, text: str) -> Any:
    """One streamed text delta in the chunk shape ``dspy.streaming.StreamListener`` understands."""
    return EngineChunk(
        id=None,
        model=model,
        predict_id=predict_id,
        choices=[attributes({"index": 0, "delta": {"content": text}, "finish_reason": None})],
    )


def report_usage(model: str, usage: Mapping[str, Any]) -> None:
    """Add one LM call's usage to DSPy's usage tracker, when one is open."""
    tracker = dspy.settings.usage_tracker
    if tracker is not None:
        tracker.add_usage(model, dict(usage))


def cache_get(key: Mapping[str, Any]) -> Any:
    """DSPy's cached answer for ``key``, or None."""
    return dspy.cache.get(dict(key))


def cache_put(key: Mapping[str, Any], value: Any) -> None:
    """Store an answer in DSPy's cache."""
    dspy.cache.put(dict(key), value)


def _quote(text: str) -> str:
    text = " ".join(str(text).split())
    if len(text) > QUOTE_CHARS:
        return repr(text[:QUOTE_CHARS]) + f" (first {QUOTE_CHARS} of {len(text)} characters)"
    return repr(text)


def parse_failure_message(program: str, error: AdapterParseError, configured: str) -> str:
    """What a caller is told when the LM's reply did not fit the signature: the adapters tried (the
    configured one, and JSONAdapter when ChatAdapter fell back to it), the reply each got (quoted,
    truncated), the fields expected, and what to change."""
    failures: list[AdapterParseError] = []
    seen: BaseException | None = error
    while isinstance(seen, AdapterParseError) and len(failures) < 4:
        failures.append(seen)
        seen = seen.__context__
    failures.reverse()  # the first adapter tried first
    names = [failure.adapter_name for failure in failures]
    tried = " then ".join(names)
    replies = "; ".join(f"{f.adapter_name} got {_quote(f.lm_response)}" for f in failures)
    expected = ", ".join(error.signature.output_fields) if error.signature is not None else "?"
    if configured == "chat":
        advice = (
            'small models often miss ChatAdapter\'s "[[ ## field ## ]]" markers: try adapter = "json" '
            "(LM_ADAPTER=json) for the engine or this program, or a stronger model"
        )
    else:
        advice = (
            'try adapter = "chat" (LM_ADAPTER=chat), a model that follows JSON instructions, or an LM '
            "that supports structured outputs"
        )
    return (
        f"program {program!r}: the LM's answer did not fit the signature (expected output fields: "
        f"{expected}). Adapters tried: {tried} (configured: {configured!r}). {replies}. To fix: {advice}."
    )
