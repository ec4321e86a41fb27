"""Types users get from the engine but must not build themselves (after trio's ``NoPublicConstructor``).

``Engine`` is only ever made by ``open_engine``, which owns its lifetime (drain, closing the LMs,
their upkeep tasks); an ``Engine(...)`` built by hand would have none of that and would need private
types to build. Calling such a class raises ``TypeError``; the engine itself uses ``cls._create(...)``.
"""

from __future__ import annotations

from typing import Any, TypeVar

_T = TypeVar("_T")


class NoPublicConstructor(type):
    """A metaclass whose classes cannot be instantiated by calling them."""

    def __call__(cls, *args: object, **kwargs: object) -> Any:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} has no public constructor; use open_engine()")

    def _create(cls: type[_T], *args: object, **kwargs: object) -> _T:
        return super().__call__(*args, **kwargs)  # type: ignore[misc, no-any-return]
