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
    """What :func:`tune_gc_for_serving` set: the objects frozen and the three thresholds."""

    frozen: int
    thresholds: tuple[int, int, int]


def tune_gc_for_serving(young_threshold: int = YOUNG_THRESHOLD) -> GCSettings:
    """Collect once, freeze what is alive (the start-up heap: modules, DSPy, the app and the engine) out
    of the collector's reach, and raise the young generation's threshold to ``young_threshold`` (never
    lowers it). Call it once the application has started, before serving. Blocks for one full collection
    (tens of milliseconds). Cyclic garbage still gets collected, only less often; reference counting frees
    everything else at once as before.

    Returns:
        The settings now in force.
    """
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, young_threshold), middle, old)
    return GCSettings(frozen=gc.get_freeze_count(), thresholds=gc.get_threshold())
