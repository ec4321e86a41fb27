"""The engine's one seam to DSPy: every DSPy name the engine uses outside its LM backends lives here.

``tests/test_dspy_contract.py`` pins the behaviour this module relies on; when a DSPy upgrade breaks
that test, this module (and the backends in ``engine/lm/``) is what changes.

What is here: the program types the engine loads and inspects (``Module``, ``Predict``,
``ChainOfThought``, ``Signature``, ``load_program``, ``ensure_signature``), the adapters by name, the
per-request settings context with DSPy's usage tracker, the parse error and what a parse failure says
to a caller, the stream chunk type, and the settings, usage tracker and cache an LM call reads.

The engine interface DSPy 3.5 keeps (``dspy.LM(model, engine=..., async_engine=...)``) is here too, as
a prototype beside the production path: :class:`TrioEngine` runs a backend as a DSPy async engine, and
:func:`open_engine_lm` gives the ``dspy.LM`` that drives it under Trio (``docs/dspy-engines.md``).

What stays elsewhere, and why: ``engine/lm/_base.py`` (``TrioLM``) subclasses ``dspy.BaseLM``, since
DSPy's adapters call ``lm.acall`` on whatever is in ``dspy.settings.lm``; ``engine/lm/threaded.py`` wraps
a stock ``dspy.LM`` (its reason to exist) and maps its error types. Both get their other DSPy names from
here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import decimal
import functools
import importlib
import json
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio
import dspy
import dspy.adapters.utils as _adapter_utils
import dspy.clients._deprecation as _deprecation
import dspy.clients.execution as _execution
import pydantic
import pydantic_core
import sniffio
import trio
from dspy.clients.call_result import attributes
from dspy.clients.engines.streaming import EngineChunk
from dspy.signatures.signature import SignatureMeta, ensure_signature
from dspy.utils.callback import with_callbacks
from dspy.utils.exceptions import AdapterParseError
from dspy.utils.usage_tracker import UsageTracker

from ._groups import open_service_nursery
from ._request_sharing import heard_parse

# Imported untyped: a static import of ``dspy.lm15`` (whose vendored package ships ``py.typed``) makes
# mypy type-check all of DSPy, which is not typed.
_lm15: Any = importlib.import_module("dspy.lm15")

__all__ = [
    "AdapterParseError",
    "ChainOfThought",
    "EngineBackend",
    "EngineLM",
    "History",
    "Module",
    "Predict",
    "Signature",
    "TrioEngine",
    "UsageTracker",
    "adapter",
    "cache_get",
    "cache_put",
    "cache_signature_fields",
    "cache_type_adapters",
    "current_stream",
    "ensure_signature",
    "load_program",
    "open_engine_lm",
    "parse_failure_message",
    "predictor_fingerprint",
    "program_context",
    "pure_predictor",
    "report_usage",
    "request_to_call",
    "roll_up_usage",
    "stream_chunk",
    "trio_safe_execution",
    "written_out",
]

Module = dspy.Module
Predict = dspy.Predict
ChainOfThought = dspy.ChainOfThought
Signature = dspy.Signature
History = dspy.History


# Named as DSPy's own: DSPy tells adapters apart by class name (StreamListener, parse errors).
class ChatAdapter(dspy.ChatAdapter):  # type: ignore[misc]
    """DSPy's ChatAdapter, telling the engine which LM answers it parsed (only those may be stored)."""

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        values: dict[str, Any] = super().parse(signature, completion)
        heard_parse(completion)
        return values


class JSONAdapter(dspy.JSONAdapter):  # type: ignore[misc]
    """DSPy's JSONAdapter, telling the engine which LM answers it parsed (only those may be stored)."""

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        values: dict[str, Any] = super().parse(signature, completion)
        heard_parse(completion)
        return values


_ADAPTER_TYPES: Mapping[str, type[Any]] = {"chat": ChatAdapter, "json": JSONAdapter}
_adapters: dict[str, Any] = {}

QUOTE_CHARS = 200  # how much of an unparsable reply a parse-failure message quotes


def adapter(name: str) -> Any:
    """The adapter called ``name`` (``chat`` or ``json``): one shared instance per name, DSPy's own
    but for one thing: each answer it parses is reported (``_request_sharing.heard_parse``), so that
    the engine stores only answers the program's adapter accepted.

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
_STOCK_INPUT_FIELDS = SignatureMeta.input_fields
_STOCK_OUTPUT_FIELDS = SignatureMeta.output_fields
# Per signature class, by id: the class (held weakly, and checked: an id is reused once its class is gone),
# the pydantic fields dict the split was made from, its input fields and its output fields. Keyed by id
# rather than held in a WeakKeyDictionary: its lookup is a Python method, and this runs ~24 times a request.
_SIGNATURE_FIELDS: dict[int, tuple[weakref.ref[type], dict[str, Any], dict[str, Any], dict[str, Any]]] = {}


def _split_fields(cls: type) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, Any]] | None:
    """``cls``'s cached split (made now if missing or stale), or None when DSPy must split it itself."""
    fields = getattr(cls, "__pydantic_fields__", None)  # what ``cls.model_fields`` returns, minus its wrapper
    if fields is None:
        return None
    key = id(cls)
    cached = _SIGNATURE_FIELDS.get(key)
    if (
        cached is None
        or cached[1] is not fields
        or cached[0]() is not cls
        or len(cached[2]) + len(cached[3]) != len(fields)
    ):
        split: dict[str, dict[str, Any]] = {"input": {}, "output": {}}
        for name, info in fields.items():
            kind = info.json_schema_extra["__dspy_field_type"]
            if kind not in split:  # not DSPy's own two kinds: leave it to DSPy
                return None
            split[kind][name] = info
        forget = functools.partial(_forget_signature, key)
        cached = (weakref.ref(cls, forget), fields, split["input"], split["output"])
        _SIGNATURE_FIELDS[key] = cached
    return cached


def _forget_signature(key: int, _: object) -> None:
    """A signature class is gone: its entry goes (called before its id can be reused)."""
    _SIGNATURE_FIELDS.pop(key, None)


def _cached_fields_with_type(cls: type, field_type: str) -> dict[str, Any]:
    """``SignatureMeta._get_fields_with_type``, split once per signature class. DSPy recomputes it on
    every ``input_fields``/``output_fields`` access (~24 times per prediction of ``question -> answer``).
    A signature's fields never change in place — DSPy's ``with_instructions``, ``append``, ``delete``,
    ``with_updated_fields`` build new classes, and pydantic's rebuild assigns a new fields dict, which
    invalidates the entry — and edits of a field's ``prefix``/``desc`` mutate the shared ``FieldInfo``
    objects, which the cached dicts hold too. Each call returns a new dict, as DSPy's does."""
    cached = _split_fields(cls) if field_type in ("input", "output") else None
    if cached is None:
        return dict(_STOCK_FIELDS_WITH_TYPE(cls, field_type))
    return dict(cached[2] if field_type == "input" else cached[3])


def _fields_reader(kind: str) -> Callable[[type], dict[str, Any]]:
    """``Signature.input_fields`` (``kind`` "input") or ``output_fields`` from the cached split: the fast
    path checked inline, so a read is one call."""
    input_side = kind == "input"

    def read(cls: type) -> dict[str, Any]:
        cached = _SIGNATURE_FIELDS.get(id(cls))
        if (
            cached is not None
            and cached[1] is getattr(cls, "__pydantic_fields__", None)
            and cached[0]() is cls
            and len(cached[2]) + len(cached[3]) == len(cached[1])
        ):
            return dict(cached[2] if input_side else cached[3])
        return _cached_fields_with_type(cls, kind)

    return read


_input_fields = _fields_reader("input")
_output_fields = _fields_reader("output")


def cache_signature_fields(enabled: bool = True) -> None:
    """Make DSPy's ``Signature.input_fields``/``output_fields`` split a signature's fields once per
    class instead of on every access (~10% of a prediction's CPU). The same fields, in the same order,
    so the prompts and parses are the same (the contract test compares them byte for byte).
    ``open_engine`` turns it on; ``enabled=False`` restores DSPy's own."""
    SignatureMeta._get_fields_with_type = _cached_fields_with_type if enabled else _STOCK_FIELDS_WITH_TYPE
    SignatureMeta.input_fields = property(_input_fields) if enabled else _STOCK_INPUT_FIELDS
    SignatureMeta.output_fields = property(_output_fields) if enabled else _STOCK_OUTPUT_FIELDS


def load_program(path: str) -> Any:
    """A program saved with ``dspy.save`` (a directory). Blocks on file reads."""
    return dspy.load(path, allow_pickle=True)


# DSPy's settings module (``dspy.dsp.utils.settings`` as an attribute is the ``Settings`` object it makes).
_dspy_settings = importlib.import_module("dspy.dsp.utils.settings")


def setting(name: str) -> Any:
    """``dspy.settings.<name>`` for a name DSPy always has (``usage_tracker``, ``callbacks``,
    ``send_stream``, ...), read as ``Settings.__getattr__`` reads it (this context's overrides, then the
    global configuration) without first failing the ordinary attribute lookup that ``dspy.settings.<name>``
    makes: it is read several times per request."""
    overrides = _dspy_settings.thread_local_overrides.get()
    if name in overrides:
        return overrides[name]
    return _dspy_settings.main_thread_config.get(name)


class program_context:  # lower case: used as ``with program_context(...) as tracker``, like a function
    """DSPy's settings for one request, in one context: its LM, its adapter, the stream router, no
    history or trace growth, and a fresh usage tracker (rolled up into an enclosing one on exit, as
    ``dspy.track_usage`` does, unless ``roll_up`` is false). Yields the tracker.

    A plain class, not a generator context manager: it is entered once per request.
    """

    __slots__ = ("_context", "_parent", "tracker")

    def __init__(self, lm: Any, adapter_name: str, send_stream: Any, *, roll_up: bool = True) -> None:
        self.tracker = UsageTracker()
        self._parent: UsageTracker | None = setting("usage_tracker") if roll_up else None
        self._context = dspy.context(
            lm=lm,
            adapter=adapter(adapter_name),
            send_stream=send_stream,
            usage_tracker=self.tracker,
            disable_history=True,
            max_trace_size=0,
            max_history_size=0,
        )

    def __enter__(self) -> UsageTracker:
        self._context.__enter__()
        return self.tracker

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self._context.__exit__(*exc_info)
        finally:
            if (parent := self._parent) is not None:
                for model, entries in self.tracker.usage_data.items():
                    parent.usage_data[model].extend(entries)


def roll_up_usage(usage_data: Mapping[str, Sequence[Any]]) -> None:
    """Add a request's usage entries (a ``UsageTracker``'s ``usage_data``) to the usage tracker open
    here, if any (an application's ``dspy.track_usage()``)."""
    parent = setting("usage_tracker")
    if parent is not None:
        for model, entries in usage_data.items():
            parent.usage_data[model].extend(entries)


# --- programs that are pure functions of their inputs and their LM's answers ----------------------

# DSPy's own modules whose prediction is one predictor's: they read nothing but their signature, demos,
# config and the settings the engine gives them (LM, adapter), and have no side effect but the LM call.
_PURE_MODULES = (dspy.Predict, dspy.ChainOfThought)


def pure_predictor(module: Any) -> Any:
    """The one predictor of ``module`` when its prediction is a pure function of its inputs and its
    LM's answers, else None.

    That is DSPy's own ``Predict`` or ``ChainOfThought`` (not a subclass, which may do anything), whose
    predictor calls the engine's LM (no LM of its own), with no callbacks (their calls are side effects)
    and DSPy's cache left on (``cache=False`` asks for a fresh answer). Never blocks.
    """
    kind = type(module)
    if kind not in _PURE_MODULES:
        return None
    # Their attributes read from their ``__dict__`` (where DSPy's own modules keep them): a module's
    # ``__getattribute__`` is Python code, run on every attribute read, and this runs for every request.
    own = vars(module)
    if own.get("callbacks"):
        return None
    predictor: Any = module if kind is dspy.Predict else own.get("predict")
    if type(predictor) is not dspy.Predict:
        return None
    own = vars(predictor) if predictor is not module else own
    if (
        own.get("lm") is not None
        or own.get("callbacks")
        or own.get("config", {}).get("cache") is False
        or setting("callbacks")
    ):
        return None
    return predictor


class _Fingerprint:
    """A predictor's fingerprint and what it was computed from (the objects, compared by identity). The
    signature class is held weakly: a class is in a reference cycle of its own, and holding it here
    would leave it for a later collection once its program is gone."""

    __slots__ = ("config", "demo_fields", "demos", "doc", "kind", "signature", "text")

    def __init__(
        self, kind: type, signature: Any, demos: list[Any], config: dict[str, Any], text: str
    ) -> None:
        self.kind = kind
        self.signature: weakref.ref[Any] = weakref.ref(signature)
        # Its instructions as written (``instructions`` is ``cleandoc(__doc__)``, made on every read).
        self.doc = signature.__doc__
        self.demos = list(demos)
        # Each demo's fields as they were (a shallow copy): an Example is mutable, and one edited in
        # place (``demo["answer"] = ...``) changes the prompt while staying the same object.
        self.demo_fields = [dict(fields) for fields in map(_demo_fields, demos)]
        self.config = dict(config)
        self.text = text

    def still(self, kind: type, signature: Any, demos: list[Any], config: dict[str, Any]) -> bool:
        """Whether it was computed from these (no allocation: it runs for every request)."""
        computed_from: Any = self.signature()
        if self.kind is not kind or computed_from is not signature or len(self.demos) != len(demos):
            return False
        if self.doc != signature.__doc__ or self.config != config:
            return False
        for index, demo in enumerate(demos):  # a loop: no generator per request
            if self.demos[index] is not demo or self.demo_fields[index] != _demo_fields(demo):
                return False
        return True


_NO_FIELDS: dict[str, Any] = {}


def _demo_fields(demo: Any) -> dict[str, Any]:
    """A demo's fields, without copying them (an Example's store, or the dict itself)."""
    if isinstance(demo, dict):
        return demo
    fields = getattr(demo, "_store", None)
    return fields if isinstance(fields, dict) else _NO_FIELDS


_FINGERPRINTS: weakref.WeakKeyDictionary[Any, _Fingerprint] = weakref.WeakKeyDictionary()
_WRITTEN_AS_TEXT = (datetime.date, datetime.time, datetime.timedelta, decimal.Decimal, uuid.UUID)


def written_out(value: Any) -> Any:
    """``value`` (not JSON's own) written out in full for a key: a pydantic model (``dspy.Image``,
    ``dspy.History``, an application's) as its type and JSON dump, a date, time, decimal or UUID as its
    type and text. Does no I/O.

    Raises:
        TypeError: a value of another type, whose ``repr`` may elide what tells two apart (an image's
            data, an array's middle): it has no key.
    """
    kind = type(value)
    if isinstance(value, pydantic.BaseModel):
        try:
            return [f"{kind.__module__}.{kind.__qualname__}", value.model_dump(mode="json")]
        except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
            raise TypeError(f"{kind.__qualname__} does not dump to JSON") from exc
    if isinstance(value, _WRITTEN_AS_TEXT):
        return [f"{kind.__module__}.{kind.__qualname__}", str(value)]
    raise TypeError(f"{kind.__qualname__} has no key")


def _written_or_repr(value: Any) -> Any:
    try:
        return written_out(value)
    except TypeError:
        return repr(value)


_fingerprint_encoder = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), sort_keys=True, default=_written_or_repr
)


def predictor_fingerprint(module: Any, predictor: Any) -> str:
    """What of ``module`` (a pure module, :func:`pure_predictor`) decides its prediction besides its
    inputs and LM: its kind, its predictor's signature (instructions, fields, their prefixes,
    descriptions and types), demos and config, as text. Does no I/O.

    Computed again whenever the signature class, its instructions, the demos (the list's items) or
    the config differ from last time; a few microseconds otherwise. (A field's prefix or description
    edited in place, which DSPy's own API never does, is not seen.)
    """
    own = vars(predictor)  # as in pure_predictor: no DSPy ``__getattribute__`` per attribute
    kind, signature, demos, config = type(module), own["signature"], own["demos"], own["config"]
    cached = _FINGERPRINTS.get(predictor)
    if cached is not None and cached.still(kind, signature, demos, config):
        return cached.text
    fields = [
        (name, dict(info.json_schema_extra or {}), repr(info.annotation))
        for name, info in signature.model_fields.items()
    ]
    shown = [dict(demo) if not isinstance(demo, dict) else demo for demo in demos]
    text = _fingerprint_encoder.encode([kind.__name__, signature.instructions, fields, shown, config])
    _FINGERPRINTS[predictor] = _Fingerprint(kind, signature, demos, config, text)
    return text


def current_stream() -> tuple[Any, int | None]:
    """Where the current DSPy call's stream chunks go (None when nobody streams it), and the id of the
    predictor making the call (how ``dspy.streaming`` routes chunks)."""
    stream = setting("send_stream")
    if stream is None:
        return None, None
    caller = setting("caller_predict")
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
    tracker = setting("usage_tracker")
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


# --- DSPy engines ---------------------------------------------------------------------------------
# DSPy 3.4 deprecates custom LMs through ``BaseLM.forward``/``aforward`` (removal planned for 3.5) in
# favour of engines: ``dspy.LM(model, engine=sync_engine, async_engine=async_engine)``, where an async
# engine has ``async complete(Request) -> Response``, ``stream(Request) -> AsyncIterator[StreamEvent]``
# and ``async aclose()`` (lm15 types). DSPy awaits an async engine's methods directly, in the caller's
# task, so an engine can be Trio-native. The ``dspy.LM`` around it is not: ``BaseLM.acall`` and
# ``dspy.clients.execution.aexecute`` call ``asyncio.to_thread`` (input preparation, advisory pricing
# after every engine call, the response cache) and ``asyncio.sleep`` (retries), which fail under
# ``trio.run``. :class:`EngineLM` and :func:`trio_safe_execution` are the smallest local change that
# makes that path run under Trio; docs/dspy-engines.md has the code paths and the experiments.

STREAM_CLOSE_WAIT = 5.0  # seconds a closed stream waits for its cancelled producer (the socket close)

# lm15 ``Config`` fields the backends take as OpenAI-style request parameters of the same name.
_CONFIG_PARAMS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "response_format",
)
# ``Config`` fields no backend of the engine sends: refused by name rather than dropped.
_REFUSED_CONFIG = (
    "tool_choice",
    "reasoning",
    "cache",
    "service_tier",
    "user_id",
    "store",
    "probabilities",
)


class EngineBackend(Protocol):
    """What :class:`TrioEngine` needs of a backend; every ``dspy_trio.engine.lm.TrioLM`` has it.

    ``complete`` gets OpenAI-style chat ``messages`` and request ``params``, pushes each text delta to
    ``sink`` when one is given, and returns a completion with ``texts``, ``usage`` (OpenAI-style
    counters) and ``reasoning``. The backend's ``supports_*`` and ``supported_params`` answers, when it
    has them, are the engine's (DSPy's adapters read them from the engine).
    """

    model: str
    kwargs: dict[str, Any]

    async def complete(
        self, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any], sink: Any
    ) -> Any: ...


def request_to_call(request: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """An lm15 ``Request`` as the backends' chat ``messages`` and request ``params``.

    Raises:
        dspy.lm15.UnsupportedFeatureError: The request has something no backend of the engine sends
            (tools, non-text content, reasoning or prompt-cache settings), named in ``feature``.
    """
    if request.tools:
        raise _lm15.UnsupportedFeatureError("the engine's backends send no tools", feature="tools")
    messages: list[dict[str, Any]] = []
    system = request.system
    if system is not None:
        if not isinstance(system, str):
            if not all(isinstance(part, _lm15.TextPart) for part in system):
                raise _lm15.UnsupportedFeatureError("non-text system content", feature="system")
            system = "".join(part.text for part in system)
        messages.append({"role": "system", "content": system})
    for index, message in enumerate(request.messages):
        text = message.text
        if text is None:
            raise _lm15.UnsupportedFeatureError("non-text message content", feature=f"messages[{index}]")
        messages.append({"role": message.role, "content": text})
    config = request.config
    for name in _REFUSED_CONFIG:
        if getattr(config, name) is not None:
            raise _lm15.UnsupportedFeatureError(f"config.{name} is not sent", feature=f"config.{name}")
    params = {name: value for name in _CONFIG_PARAMS if (value := getattr(config, name)) is not None}
    response_format = params.get("response_format")
    if response_format is not None and response_format.get("type") == "json_schema":
        # lm15 keeps a schema's name, schema and strictness beside the type; the wire nests them.
        schema = {key: value for key, value in response_format.items() if key != "type"}
        params["response_format"] = {"type": "json_schema", "json_schema": schema}
    if config.stop:
        params["stop"] = list(config.stop)
    if config.logprobs is not None:
        params["logprobs"] = True
        if config.logprobs:
            params["top_logprobs"] = config.logprobs
    params.update(config.extensions or {})
    return messages, params


def _usage(usage: Mapping[str, Any]) -> Any:
    """OpenAI-style usage counters as an lm15 ``Usage`` (what a provider did not report stays None)."""

    def count(key: str) -> int | None:
        value = usage.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return _lm15.Usage(
        input_tokens=count("prompt_tokens"),
        output_tokens=count("completion_tokens"),
        total_tokens=count("total_tokens"),
    )


def _response(model: str, completion: Any) -> Any:
    """A backend's completion (its first choice: an engine answers one candidate) as an lm15 ``Response``."""
    text = completion.texts[0] if completion.texts else ""
    reasoning = completion.reasoning[0] if completion.reasoning else None
    parts: list[Any] = [_lm15.TextPart(text)]
    if reasoning:
        parts.insert(0, _lm15.ThinkingPart(reasoning))
    return _lm15.Response(
        id=None,
        model=model,
        message=_lm15.Message.assistant(parts),
        finish_reason="stop",
        usage=_usage(completion.usage),
    )


class _BackendCapabilities:
    """What DSPy's adapters ask an LM with a custom engine, answered by the backend. DSPy reads them
    from the *sync* engine (``LM.engine``), so both engines of the pair carry them."""

    backend: EngineBackend

    @property
    def supports_function_calling(self) -> bool:
        return bool(getattr(self.backend, "supports_function_calling", False))

    @property
    def supports_reasoning(self) -> bool:
        return bool(getattr(self.backend, "supports_reasoning", False))

    @property
    def supports_response_schema(self) -> bool:
        return bool(getattr(self.backend, "supports_response_schema", False))

    @property
    def supported_params(self) -> set[str]:
        return set(getattr(self.backend, "supported_params", ()) or ())


class TrioEngine(_BackendCapabilities):
    """A DSPy async engine over one of the engine's backends, Trio-native.

    ``complete`` runs the backend in the caller's task, so the caller's cancel scope reaches the
    provider's socket. ``stream`` returns lm15 events (start, one text delta per backend delta, end);
    the backend pushes its deltas while DSPy pulls events, so each stream runs the backend in a producer
    task in ``nursery`` (see :class:`_EventStream`). Use it through :func:`open_engine_lm`.

    Args:
        backend: The backend (an ``dspy_trio.engine.lm.TrioLM``); borrowed, never closed here.
        nursery: Where stream producers run; it must outlive every stream.
    """

    def __init__(self, backend: EngineBackend, nursery: trio.Nursery) -> None:
        self.backend = backend
        self.nursery = nursery

    def __repr__(self) -> str:
        return f"TrioEngine({self.backend!r})"

    async def complete(self, request: Any) -> Any:
        """One completion as an lm15 ``Response``. Blocks for the whole call, in the caller's task."""
        messages, params = request_to_call(request)
        return _response(self.backend.model, await self.backend.complete(messages, params, None))

    def stream(self, request: Any) -> _EventStream:
        """One completion as lm15 stream events; nothing runs until the first event is awaited. Close
        the iterator (``aclose``) when done with it, as DSPy does: that ends the backend's call."""
        return _EventStream(self, request)

    async def aclose(self) -> None:
        """Nothing to release: the backend is borrowed (close it where it was opened)."""


class _Failed:
    """A producer's exception, handed to the consumer's task to raise there."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class _EventSink:
    """The backend's sink in a stream producer: each text delta becomes one lm15 delta event."""

    __slots__ = ("_send",)

    def __init__(self, send: trio.MemorySendChannel[Any]) -> None:
        self._send = send

    async def send(self, text: str) -> None:
        """Hand over one delta; blocks until the consumer takes it."""
        await self._send.send(_lm15.StreamDeltaEvent(delta=_lm15.TextDelta(text=text)))


class _EventStream:
    """``TrioEngine.stream``'s async iterator.

    The backend pushes (it reads the provider's stream inside its own ``complete``) and DSPy pulls
    (``async for event in engine.stream(request)``), so the backend runs in a producer task in the
    engine's nursery, started by the first ``__anext__`` (in the caller's task, so it inherits the
    caller's context: DSPy's settings, the request's trace). A zero-capacity channel hands over
    each event, so a consumer that does not read pauses the provider's socket read. Failures of the
    producer are raised in the consumer's task. ``aclose`` cancels the producer and waits (at most
    ``STREAM_CLOSE_WAIT`` seconds) until it has ended, i.e. until the provider's connection is closed;
    DSPy closes every stream it opens, shielded, also when its caller was cancelled.
    """

    def __init__(self, engine: TrioEngine, request: Any) -> None:
        self._engine = engine
        self._request = request
        self._receive: trio.MemoryReceiveChannel[Any] | None = None
        self._scope = trio.CancelScope()
        self._ended = trio.Event()

    def __aiter__(self) -> _EventStream:
        return self

    async def __anext__(self) -> Any:
        if self._receive is None:
            messages, params = request_to_call(self._request)  # refused here, before any task starts
            send, self._receive = trio.open_memory_channel[Any](0)
            self._engine.nursery.start_soon(self._produce, send, messages, params)
        try:
            item = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None
        if isinstance(item, _Failed):
            raise item.error
        return item

    async def _produce(
        self, send: trio.MemorySendChannel[Any], messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> None:
        backend = self._engine.backend
        try:
            with self._scope, send:
                try:
                    await send.send(_lm15.StreamStartEvent(model=backend.model))
                    completion = await backend.complete(messages, params, _EventSink(send))
                    reasoning = completion.reasoning[0] if completion.reasoning else None
                    if reasoning:
                        await send.send(_lm15.StreamDeltaEvent(delta=_lm15.ThinkingDelta(text=reasoning)))
                    end = _lm15.StreamEndEvent(finish_reason="stop", usage=_usage(completion.usage))
                    await send.send(end)
                except Exception as exc:  # raised again in the consumer's task, if it is still there
                    with contextlib.suppress(trio.BrokenResourceError):
                        await send.send(_Failed(exc))
        finally:
            self._ended.set()

    async def aclose(self) -> None:
        """Stop the producer (closing the provider's connection) and wait until it has ended."""
        self._scope.cancel()
        if self._receive is None:
            return
        self._receive.close()
        with trio.move_on_after(STREAM_CLOSE_WAIT):
            await self._ended.wait()


class _AsyncOnlyEngine(_BackendCapabilities):
    """The sync engine ``dspy.LM(engine=...)`` requires: it refuses to run, as ``TrioLM``'s sync path
    does, and answers DSPy's capability questions for the pair."""

    def __init__(self, backend: EngineBackend) -> None:
        self.backend = backend

    def _refuse(self) -> RuntimeError:
        return RuntimeError(
            f"{self.backend.model} is async-only: run programs with `await program.acall(...)` under Trio"
        )

    def complete(self, request: Any) -> Any:
        raise self._refuse()

    def stream(self, request: Any) -> Any:
        raise self._refuse()

    def close(self) -> None:
        """Nothing to release."""


class _TrioSafeAsyncio:
    """Stands in for the ``asyncio`` module inside ``dspy.clients.execution``: under asyncio every name
    is asyncio's own; under any other event loop (Trio) ``to_thread`` and ``sleep`` are anyio's."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def to_thread(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if sniffio.current_async_library() == "asyncio":
            return await asyncio.to_thread(func, *args, **kwargs)
        return await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs))

    @staticmethod
    async def sleep(seconds: float) -> None:
        if sniffio.current_async_library() == "asyncio":
            await asyncio.sleep(seconds)
        else:
            await anyio.sleep(seconds)


_TRIO_SAFE_ASYNCIO = _TrioSafeAsyncio()


def trio_safe_execution(enabled: bool = True) -> None:
    """Make DSPy's LM execution (``dspy.clients.execution``: ``aexecute``'s response cache, advisory
    pricing and retry sleeps) run under Trio, by giving that module an ``asyncio`` whose ``to_thread``
    and ``sleep`` are anyio's when the running loop is not asyncio's. Under asyncio nothing changes.
    :func:`open_engine_lm` turns it on; ``enabled=False`` restores DSPy's own."""
    _execution.asyncio = _TRIO_SAFE_ASYNCIO if enabled else asyncio


class EngineLM(dspy.LM):  # type: ignore[misc]
    """A ``dspy.LM`` over a :class:`TrioEngine` whose ``acall`` runs under Trio.

    ``BaseLM.acall`` prepares each call in a worker thread with ``asyncio.to_thread``; this one prepares
    it inline (an adapter's text messages need no I/O; a ``Request`` with local media files is still
    read in a worker thread), then runs DSPy's own ``aexecute`` and ``finalize``: DSPy's cache, retries,
    usage tracking, history and callbacks, as for any engine. Needs :func:`trio_safe_execution`.
    """

    @with_callbacks  # type: ignore[untyped-decorator]
    async def acall(self, prompt: Any = None, *, messages: Any = None, **kwargs: Any) -> Any:
        if isinstance(prompt, _lm15.Request) or "request" in kwargs:
            call = await _TRIO_SAFE_ASYNCIO.to_thread(
                _execution.prepare, self, prompt, messages, kwargs, asynchronous=True
            )
        else:
            call = _execution.prepare(self, prompt, messages, kwargs, asynchronous=True)
        if not call.managed:
            _deprecation.warn_legacy_lm()
        _deprecation.warn_openai_messages(self, messages)
        return _execution.finalize(self, call, await _execution.aexecute(self, call))

    async def aclose(self) -> None:
        """Close DSPy's own pools (none: a custom engine is borrowed). ``LM.aclose`` reads asyncio's
        running loop, which Trio has not."""
        self.close()


@asynccontextmanager
async def open_engine_lm(backend: EngineBackend, *, cache: bool = False) -> AsyncIterator[EngineLM]:
    """A ``dspy.LM`` whose async engine is ``backend`` (a :class:`TrioEngine`), for the block.

    The block owns the nursery the engine's stream producers run in; leaving it cancels streams still
    running. DSPy's retries are off (``num_retries=0``: the engine's upstream guard retries), its
    response cache is off unless ``cache``, and the LM's default parameters are the backend's.
    """
    trio_safe_execution()
    async with open_service_nursery() as nursery:
        yield EngineLM(
            backend.model,
            engine=_AsyncOnlyEngine(backend),
            async_engine=TrioEngine(backend, nursery),
            cache=cache,
            num_retries=0,
            **backend.kwargs,
        )
