"""A client's JSON Schema (``response_format``'s ``json_schema``), checked so that it cannot reach out of
the process or hold it.

::

    problem = schema_problem(schema)              # None, or why the schema cannot be used (a 400)
    error = first_error(schema, value)            # None, or the outputs' first mismatch

- **References stay inside the schema.** ``$ref`` and ``$dynamicRef`` resolve against the schema itself
  and JSON Schema's own meta-schemas, never by retrieval: jsonschema's default fetches a URL it does not
  know (a request forgery from the server's network), and a reference that names nothing only failed
  when the outputs were checked, after the program ran (a 500). Every reference is resolved up front.
- **A pattern has a time budget.** ``pattern`` is matched with the ``regex`` module under
  :data:`MATCH_BUDGET` seconds for the whole check, since a backtracking pattern (``^(a|a)*$``) against
  the LM's text would otherwise hold the event loop, and every request of the process, for ever. A
  match that runs out of it is a mismatch naming the pattern.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jsonschema
import referencing
import referencing.exceptions
import referencing.jsonschema
import regex
from jsonschema_specifications import REGISTRY as _SPECIFICATIONS
from referencing._core import Resolver

# Seconds every ``pattern`` of one check may take in all: far beyond what a sane pattern needs against
# an answer, short enough that a hostile one stalls the process only that long.
MATCH_BUDGET = 0.25

_BASE = jsonschema.Draft202012Validator
# Keywords whose values are data, not schemas: a "$ref" key inside them is not a reference.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
_deadline: contextvars.ContextVar[float] = contextvars.ContextVar("json_schema_deadline")


def _no_retrieval(uri: str) -> referencing.Resource[Any]:
    raise referencing.exceptions.NoSuchResource(uri)


_REGISTRY: referencing.jsonschema.SchemaRegistry = referencing.Registry(retrieve=_no_retrieval)  # type: ignore[call-arg]  # attrs alias of _retrieve


def _pattern(
    validator: Any, pattern: str, instance: Any, schema: Any
) -> Iterator[jsonschema.ValidationError]:
    """``pattern`` under the check's time budget."""
    if not validator.is_type(instance, "string"):
        return
    left = _deadline.get(time.monotonic() + MATCH_BUDGET) - time.monotonic()
    try:
        if left <= 0:
            raise TimeoutError
        found = regex.search(pattern, instance, timeout=left)
    except TimeoutError:
        yield jsonschema.ValidationError(
            f"the pattern {pattern[:100]!r} took longer than {MATCH_BUDGET:g}s to match (a pattern that "
            "backtracks); it is taken as not matching"
        )
        return
    except regex.error as error:
        yield jsonschema.ValidationError(
            f"the pattern {pattern[:100]!r} is not a regular expression: {error}"
        )
        return
    if found is None:
        yield jsonschema.ValidationError(f"{instance[:100]!r} does not match {pattern[:100]!r}")


_Validator = jsonschema.validators.extend(_BASE, {"pattern": _pattern})


def _references(node: Any, resolver: Resolver[Any]) -> Iterator[tuple[str, Any]]:
    """Every reference of the schema ``node``, with the resolver its base URI gives it."""
    if isinstance(node, Mapping):
        if isinstance(node.get("$id"), str):
            resolver = resolver.in_subresource(referencing.jsonschema.DRAFT202012.create_resource(node))
        for key in ("$ref", "$dynamicRef"):
            if isinstance(node.get(key), str):
                yield node[key], resolver
        for key, value in node.items():
            if key not in _DATA_KEYWORDS:
                yield from _references(value, resolver)
    elif isinstance(node, list):
        for value in node:
            yield from _references(value, resolver)


def schema_problem(schema: Mapping[str, Any]) -> str | None:
    """Why ``schema`` cannot check an answer (not a JSON Schema, a reference that does not resolve
    within it, a pattern that is not a regular expression), or None."""
    try:
        _BASE.check_schema(schema)
    except jsonschema.SchemaError as error:
        return f"not a JSON Schema: {error.message[:200]}"
    resource = referencing.jsonschema.DRAFT202012.create_resource(schema)
    registry = _SPECIFICATIONS.combine(_REGISTRY).with_resource(resource.id() or "", resource)
    resolver = registry.resolver(base_uri=resource.id() or "")
    for reference, base in _references(schema, resolver):
        try:
            base.lookup(reference)
        except referencing.exceptions.Unresolvable:
            return (
                f"the reference $ref {reference[:200]!r} does not resolve within the schema (only "
                "references to the schema itself, such as #/$defs/name, are followed)"
            )
    for pattern in _patterns(schema):
        try:
            regex.compile(pattern)
        except regex.error as error:
            return f"the pattern {pattern[:100]!r} is not a regular expression: {error}"
    return None


def _patterns(node: Any) -> Iterator[str]:
    if isinstance(node, Mapping):
        if isinstance(node.get("pattern"), str):
            yield node["pattern"]
        for key, value in node.items():
            if key not in _DATA_KEYWORDS:
                yield from _patterns(value)
    elif isinstance(node, list):
        for value in node:
            yield from _patterns(value)


def first_error(schema: Mapping[str, Any], value: Any) -> jsonschema.ValidationError | None:
    """The most relevant way ``value`` breaks ``schema`` (checked by :func:`schema_problem`), or None.
    Blocks the thread for at most about :data:`MATCH_BUDGET` seconds of pattern matching."""
    token = _deadline.set(time.monotonic() + MATCH_BUDGET)
    try:
        validator = _Validator(schema, registry=_REGISTRY)
        try:
            return jsonschema.exceptions.best_match(validator.iter_errors(value))
        except referencing.exceptions.Unresolvable as error:  # schema_problem resolved them all
            return jsonschema.ValidationError(f"a reference does not resolve: {error}")
    finally:
        _deadline.reset(token)


__all__ = ["MATCH_BUDGET", "first_error", "schema_problem"]
