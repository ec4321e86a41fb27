"""The garbage collector settings a long-running serving process wants.

CPython's cyclic collector runs a young collection every 700 net container allocations and, now and
then, a full collection that walks every tracked object — DSPy, litellm and pydantic make that a heap of
~80,000+ objects, so a full collection stalls the event loop for 100-300 ms. With hundreds of requests in
flight, the young collections also keep finding the same live request objects and promoting them, so the
middle and full collections run often. Measured (``benchmarks/hotpath.py``, parts ``gc`` and ``c1000``):
at 64 concurrent predictions, the collector took 0.25-0.36 ms of CPU per prediction with the defaults,
0.13-0.16 after :func:`gc.freeze`, and ~0.003 with the young threshold at 10,000 as well; at 1,000
concurrent, two full collections took ~0.3 s of the run.

:func:`tune_gc_for_serving` does both. It is process-wide, so the engine never calls it by itself:
``dspy-trio serve`` does once started, and an application embedding the engine may.
"""

from __future__ import annotations

import gc

import attrs

YOUNG_THRESHOLD = 10_000


@attrs.frozen
class GCSettings:
    """What :func:`tune_gc_for_serving` set: the objects frozen, the three thresholds, and the
    thresholds before (what :meth:`restore` puts back)."""

    frozen: int
    thresholds: tuple[int, int, int]
    previous: tuple[int, int, int]

    def restore(self) -> None:
        """Undo :func:`tune_gc_for_serving` when the serving part of a process ends but the process
        goes on (tests, an embedding app): unfreeze, so what serving left behind can be collected, and
        put the thresholds back."""
        gc.unfreeze()
        gc.set_threshold(*self.previous)


def tune_gc_for_serving(young_threshold: int = YOUNG_THRESHOLD) -> GCSettings:
    """Collect once, freeze what is alive (the start-up heap: modules, DSPy, the app and the engine) out
    of the collector's reach, and raise the young generation's threshold to ``young_threshold`` (never
    lowers it, and leaves automatic collection off if the application turned it off). Call it once the
    application has started, before serving; :meth:`GCSettings.restore` undoes it. Blocks for one full
    collection (tens of milliseconds). Cyclic garbage still gets collected, only less often; reference
    counting frees everything else at once as before.

    Returns:
        The settings now in force.
    """
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    young, middle, old = previous
    if young != 0:  # 0: the application turned automatic collection off; leave it off
        gc.set_threshold(max(young, young_threshold), middle, old)
    return GCSettings(frozen=gc.get_freeze_count(), thresholds=gc.get_threshold(), previous=previous)
