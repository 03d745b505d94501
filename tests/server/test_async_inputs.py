"""AsyncInputWorkers' failure paths on a stand-in pool: a hung worker times its request out
and is replaced, shutdown kills a worker stuck in a task, worker errors keep their status
and never leak internals."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import time
from typing import Any

import msgspec
import pytest

from mmengine.async_inputs import AsyncInputWorkers, MediaInputError
from mmengine.input_processor import InputWorkers, ProcessedMsg
from tests.server.harness import pid_alive, wait_for


def _answer(mode: str) -> bytes:
    """Runs in the stand-in worker process."""
    if mode == "hang":
        time.sleep(60)
    if mode == "crash":
        raise RuntimeError("decoder exploded at 0xdeadbeef in /usr/lib/libav.so")
    if mode == "too-big":
        return msgspec.msgpack.encode(
            ProcessedMsg(error="The video is too long.", error_status=413)
        )
    return msgspec.msgpack.encode(ProcessedMsg(prompt_token_ids=[1, 2, 3]))


class StandInWorkers:
    """``InputWorkers``' interface over a real one-process pool; ``mm_data["mode"]`` says
    what the worker does with the request."""

    num_workers = 1

    def __init__(self) -> None:
        self._pool = concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("fork")
        )

    def launch(self) -> list[Any]:
        return InputWorkers.launch(self)  # type: ignore[arg-type]

    def start(self, timeout_s: float = 120.0) -> float:
        return InputWorkers.start(self, timeout_s)  # type: ignore[arg-type]

    def submit(self, ids: list[int], mm_data: dict[str, Any], uuids: Any, trusted: bool = False):  # noqa: ANN201
        return self._pool.submit(_answer, mm_data.get("mode", "ok"))

    def decode(self, raw: bytes) -> ProcessedMsg:
        return msgspec.msgpack.decode(raw, type=ProcessedMsg)

    def discard_result(self, future: Any) -> None:
        InputWorkers.discard_result(self, future)  # type: ignore[arg-type]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def start(timeout_s: float = 30.0) -> AsyncInputWorkers:
    workers = AsyncInputWorkers(StandInWorkers, num_workers=1, timeout_s=timeout_s)
    asyncio.run(workers.warm_up())
    return workers


def test_a_hung_worker_times_its_request_out_with_400_and_the_pool_is_replaced() -> None:
    workers = start(timeout_s=0.5)
    try:
        (hung,) = workers.pids
        started = time.monotonic()
        with pytest.raises(MediaInputError) as info:
            asyncio.run(workers.process([1], {"mode": "hang"}, None))
        assert time.monotonic() - started < 3
        assert info.value.status == 400 and "too long" in info.value.message
        assert workers.restarts == 1
        wait_for(lambda: not pid_alive(hung), timeout=5)  # killed, not left to sleep
        assert asyncio.run(workers.process([1], {"mode": "ok"}, None)).prompt_token_ids == [1, 2, 3]
        assert workers.pids and workers.pids != [hung]
    finally:
        workers.shutdown()


def test_shutdown_kills_a_worker_stuck_in_a_task() -> None:
    workers = start()
    (pid,) = workers.pids

    async def hang_then_stop() -> None:
        task = asyncio.ensure_future(workers.process([1], {"mode": "hang"}, None))
        await asyncio.sleep(0.3)  # the worker is inside the task now
        started = time.monotonic()
        workers.shutdown(timeout_s=0.5)
        assert time.monotonic() - started < 3
        task.cancel()

    asyncio.run(hang_then_stop())
    wait_for(lambda: not pid_alive(pid), timeout=5)


def test_worker_errors_keep_their_status_and_crashes_leak_nothing() -> None:
    workers = start()
    try:
        with pytest.raises(MediaInputError) as too_big:
            asyncio.run(workers.process([1], {"mode": "too-big"}, None))
        assert (too_big.value.status, too_big.value.message) == (413, "The video is too long.")
        with pytest.raises(MediaInputError) as crash:
            asyncio.run(workers.process([1], {"mode": "crash"}, None))
        assert crash.value.status == 400
        assert "0x" not in crash.value.message and "/usr" not in crash.value.message
        assert workers.restarts == 0  # the worker survived both
    finally:
        workers.shutdown()
