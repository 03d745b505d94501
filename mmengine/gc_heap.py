"""Keeps Python's cyclic garbage collector off the start-up heap.

Python's full (generation-2) collections traverse every tracked object. After start-up
that is ~340k objects (torch, the model, compiled code, the tokenizer), and one such pass
took 173 ms on the dev CPU in the middle of a 256-request run (8 ms once the start-up heap
is frozen: `benchmarks/bench_host_overhead.py`, GC callbacks). They fire every few seconds
under load and stall whatever loop they land in: in the engine core, the GPU waits.

`gc.freeze()` moves every object alive now into a generation the collector never scans.
Frozen objects are still freed by reference counting; only reference cycles among them
would never be collected. So the engine-core process freezes once its engine is built (it
lives as long as the process), while the frontends (`LLM`, `AsyncLLM`) freeze after their
start-up and unfreeze at shutdown, so that an engine dropped in a notebook or a test
process is collectable again.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger(__name__)


def freeze_startup_heap() -> None:
    """Collects once, then takes every object alive out of future collections."""
    gc.collect()
    gc.freeze()
    logger.debug("froze %d start-up objects out of the cyclic GC", gc.get_freeze_count())


def release_startup_heap() -> None:
    """Gives frozen objects back to the collector (an engine is being shut down)."""
    gc.unfreeze()
