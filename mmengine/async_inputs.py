"""The input-processing workers seen from an event loop: submit, await, map failures, restart.

``InputWorkers`` (``mmengine.input_processor``) runs fetch / decode / preprocess / hash /
placeholder expansion in worker processes and hands back a ``concurrent.futures`` future.
``AsyncInputWorkers`` awaits that future without blocking the loop, turns every failure
into one of two typed errors (a client-safe 4xx, or a 5xx when a worker died), and
replaces a pool whose worker died or hung, so that later requests are served again
(SECURITY.md items 7 and 15).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from mmengine.config import EngineConfig
from mmengine.input_processor import InputWorkers, ProcessedMsg
from mmengine.model_loader import read_config, resolve_model_path
from mmengine.shm_payloads import PayloadSession
from processors.config import MediaConfig

logger = logging.getLogger(__name__)


class MediaInputError(ValueError):
    """The request's media (or its placeholders) was refused; a 4xx for the client.

    Attributes:
        message: Text safe to return to the client (a processors ``MediaError`` message
            or one written here; never a traceback or a path).
        status: The HTTP status to answer with (400, or 413 for size limits).
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class InputWorkerDiedError(RuntimeError):
    """An input-processing worker died while this request was queued or running on it.

    The pool has been replaced by the time this is raised; the request itself is lost
    (it is not retried: input that crashes a decoder would crash the next worker too).
    """


async def start_input_workers(
    config: EngineConfig, media_config: MediaConfig, dtype_name: str, timeout_s: float
) -> AsyncInputWorkers | None:
    """The started input workers of ``config.model``, or None for a text-only model.

    Args:
        dtype_name: The engine's dtype ("float32", "bfloat16"...): pixels are sent in it,
            so the engine core does not cast them.
    """
    import torch

    path = resolve_model_path(config.model, config.revision)
    hf_config = await asyncio.to_thread(read_config, path)
    if "vision_config" not in hf_config:
        return None

    def make_pool() -> InputWorkers:
        return InputWorkers(
            path,
            hf_config,
            media_config,
            config.limit_mm_per_prompt,
            getattr(torch, dtype_name),
            config.num_input_workers,
        )

    workers = AsyncInputWorkers(make_pool, config.num_input_workers, timeout_s)
    try:
        await workers.warm_up()
    except BaseException:
        workers.shutdown()
        raise
    return workers


class AsyncInputWorkers:
    """An ``InputWorkers`` pool driven from asyncio, replaced when it breaks.

    Args:
        factory: Builds a fresh pool (called once now and once per restart).
        num_workers: Processes per pool (0: one thread in this process).
        timeout_s: Longest one request may spend queued for and inside a worker; past
            it the request fails with a 4xx and the pool is replaced, since a worker
            that hangs would otherwise hold its slot forever.
    """

    def __init__(
        self, factory: Callable[[], InputWorkers], num_workers: int, timeout_s: float
    ) -> None:
        self._factory = factory
        self._num_workers = num_workers
        self.timeout_s = timeout_s
        self.restarts = 0  # pools replaced after a worker died or hung
        self._workers: InputWorkers | None = factory()
        self._retired: list[PayloadSession] = []  # payload sessions of replaced pools

    # ---- lifecycle -------------------------------------------------------------------------
    async def warm_up(self, timeout_s: float = 120.0) -> None:
        """Starts the worker processes now, so the first request does not pay for it and a
        worker that cannot start fails the engine's start instead of a request.

        Raises:
            RuntimeError: a worker could not start (its initializer failed).
        """
        seconds = await asyncio.to_thread(self._live().start, timeout_s)
        logger.info(
            "input processing: %d worker process(es) ready in %.1f s", self._num_workers, seconds
        )

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stops the pool; workers still busy after ``timeout_s`` are killed.

        Synchronous (it runs in ``AsyncLLM.shutdown``); blocks at most ~timeout_s + 5 s.
        """
        workers, self._workers = self._workers, None
        for session in self._retired:
            session.close()
        self._retired.clear()
        if workers is None:
            return
        procs = _processes(workers)
        # The pool's own shutdown sends each worker a stop marker and joins it; a worker
        # stuck inside a task never reads the marker, hence the thread and the kill.
        stopper = threading.Thread(target=workers.shutdown, name="mm-input-stop", daemon=True)
        stopper.start()
        stopper.join(timeout_s)
        if stopper.is_alive():
            logger.warning("input-processing workers did not stop in %.0fs: killing", timeout_s)
            for proc in procs:
                proc.kill()
            stopper.join(5.0)

    @property
    def pids(self) -> list[int]:
        """Process ids of the current pool's workers (empty in thread mode)."""
        return [] if self._workers is None else [p.pid for p in _processes(self._workers)]

    # ---- requests --------------------------------------------------------------------------
    async def process(
        self,
        prompt_token_ids: list[int],
        mm_data: dict[str, Any],
        mm_uuids: dict[str, Any] | None,
        trusted: bool = False,
    ) -> ProcessedMsg:
        """The prompt with its media preprocessed and its placeholders expanded.

        Raises:
            MediaInputError: the media or the placeholders were refused (4xx), or the
                request took longer than ``timeout_s``.
            InputWorkerDiedError: a worker died while the request was in the pool (5xx).
        """
        workers = self._live()
        try:
            future = workers.submit(prompt_token_ids, mm_data, mm_uuids, trusted)
        except BrokenProcessPool:
            # The pool broke while idle: nothing of this request was lost, so it can go to
            # a fresh pool.
            self._replace(workers, kill=False)
            workers = self._live()
            future = workers.submit(prompt_token_ids, mm_data, mm_uuids, trusted)
        try:
            async with asyncio.timeout(self.timeout_s):
                raw = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # Nobody will take this result: when it comes, delete its pixel payloads.
            future.add_done_callback(workers.discard_result)
            raise
        except TimeoutError:
            future.add_done_callback(workers.discard_result)
            self._replace(workers, kill=True)
            raise MediaInputError("The media took too long to process.") from None
        except BrokenProcessPool:
            self._replace(workers, kill=False)
            raise InputWorkerDiedError(
                "An input-processing worker died while handling this request; it has been "
                "restarted."
            ) from None
        except Exception as e:
            # A preprocessing bug or a decoder failure the workers do not map: this request
            # fails; its details go to the log, never to the client.
            logger.error("input processing failed: %s", type(e).__name__, exc_info=e)
            raise MediaInputError("The media could not be processed.") from None
        msg = workers.decode(raw)
        if msg.error is not None:
            raise MediaInputError(msg.error, msg.error_status)
        return msg

    # ---- internals -------------------------------------------------------------------------
    def _live(self) -> InputWorkers:
        if self._workers is None:
            raise RuntimeError("the input-processing workers have been shut down")
        return self._workers

    def _replace(self, broken: InputWorkers, *, kill: bool) -> None:
        """Swaps in a fresh pool unless a concurrent request already did.

        Args:
            kill: The old pool's workers may still be running (a hang): kill them. A
                broken pool has already terminated its workers itself.
        """
        if self._workers is not broken:
            return
        self.restarts += 1
        logger.error("an input-processing worker died or hung: restarting the worker pool")
        if kill:
            for proc in _processes(broken):
                proc.kill()
        _executor(broken).shutdown(wait=False, cancel_futures=True)
        retired = getattr(broken, "payloads", None)
        if retired is not None:
            # Results of the old pool already handed out may still be on their way to the
            # engine: delete what is left of its payload files a little later.
            self._retired.append(retired)
            timer = threading.Timer(_RETIRED_PAYLOADS_S, retired.close)
            timer.daemon = True
            timer.start()
        self._workers = self._factory()
        # Start the new processes now rather than during the next requests (not waiting
        # for them here: this runs on the event loop).
        self._workers.launch()


_RETIRED_PAYLOADS_S = 30.0  # grace before a replaced pool's payload files are deleted


def _executor(workers: InputWorkers) -> Any:
    """The pool's executor. ``InputWorkers`` keeps it private and its ``shutdown`` waits
    for running tasks, which a restart or a stuck worker cannot afford."""
    return workers._pool  # noqa: SLF001


def _processes(workers: InputWorkers) -> list[Any]:
    """The pool's live ``multiprocessing.Process`` objects (none for a thread pool)."""
    return list((getattr(_executor(workers), "_processes", None) or {}).values())
