"""BytesProcessPool: the input workers' pool, whose results are never unpickled
(SECURITY.md 17), and which breaks like ProcessPoolExecutor when a worker dies."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import signal
import time
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from mmengine.bytes_pool import BytesProcessPool

FORK = mp.get_context("fork")


class _Evil:
    """Unpickling it creates a file: a stand-in for code run by a hostile pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


def _echo(data: bytes) -> bytes:
    return data


def _pid() -> bytes:
    return str(os.getpid()).encode()


def _fail() -> bytes:
    raise ValueError("bad input")


def _not_bytes() -> bytes:
    return 5  # type: ignore[return-value]


def _compromised(marker: str) -> bytes:
    """What a worker taken over through a decoder bug could do: write a pickle of its
    choosing straight onto its pipe to the frontend."""
    (conn,) = [o for o in gc.get_objects() if isinstance(o, Connection) and not o.closed]
    conn.send_bytes(pickle.dumps(_Evil(marker)))
    return b"ok"


def _sleep(seconds: float) -> bytes:
    time.sleep(seconds)
    return b"slept"


def _init_fails() -> None:
    raise RuntimeError("no processor files")


@pytest.fixture
def pool():
    p = BytesProcessPool(2, FORK)
    yield p
    p.shutdown(wait=True, cancel_futures=True)


def test_results_are_the_tasks_bytes_and_task_errors_fail_only_their_task(pool) -> None:
    assert pool.submit(_echo, b"\x00abc" * 1000).result(timeout=10) == b"\x00abc" * 1000
    with pytest.raises(RuntimeError, match="ValueError: bad input"):
        pool.submit(_fail).result(timeout=10)
    with pytest.raises(RuntimeError, match="must return bytes"):
        pool.submit(_not_bytes).result(timeout=10)
    with pytest.raises((TypeError, AttributeError, pickle.PicklingError)):
        pool.submit(_echo, lambda: None).result(timeout=10)  # cannot be sent
    assert pool.submit(_echo, b"still fine").result(timeout=10) == b"still fine"


def test_a_pickle_written_by_a_compromised_worker_is_never_unpickled(pool, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    try:
        pool.submit(_compromised, str(marker)).result(timeout=10)
    except RuntimeError:
        pass  # a garbled reply fails the task; what matters is what did not run
    time.sleep(0.2)
    assert not marker.exists()
    # With an executor that unpickles its result pipe the same bytes would run:
    pickle.loads(pickle.dumps(_Evil(str(marker))))
    assert marker.exists()


def test_a_worker_dying_while_idle_breaks_the_pool_at_once_and_is_reaped(pool) -> None:
    pids = {int(pool.submit(_pid).result(timeout=10)) for _ in range(6)}
    victim = next(iter(pids))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            pool.submit(_echo, b"x").result(timeout=5)
        except BrokenProcessPool:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the pool did not notice the dead worker")
    with pytest.raises(BrokenProcessPool):
        pool.submit(_echo, b"x")
    time.sleep(0.5)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pool._processes)  # noqa: SLF001


def test_a_worker_dying_mid_task_fails_the_pending_tasks_with_broken_pool(pool) -> None:
    running = pool.submit(_sleep, 30)
    queued = [pool.submit(_sleep, 30) for _ in range(3)]
    time.sleep(0.5)
    for proc in list(pool._processes.values()):  # noqa: SLF001
        os.kill(proc.pid, signal.SIGKILL)
        break
    for future in [running, *queued]:
        with pytest.raises(BrokenProcessPool):
            future.result(timeout=10)


def test_a_failing_initializer_breaks_the_pool_with_its_reason() -> None:
    pool = BytesProcessPool(1, FORK, initializer=_init_fails)
    try:
        with pytest.raises(BrokenProcessPool, match="no processor files"):
            pool.submit(_pid).result(timeout=10)
    finally:
        pool.shutdown()


def test_shutdown_stops_every_worker_and_cancels_queued_tasks() -> None:
    pool = BytesProcessPool(1, FORK)
    running = pool.submit(_sleep, 0.5)
    queued = pool.submit(_sleep, 30)
    time.sleep(0.2)
    pool.shutdown(wait=True, cancel_futures=True)
    assert running.result(timeout=1) == b"slept" and queued.cancelled()
    assert not any(p.is_alive() for p in pool._processes.values())  # noqa: SLF001
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(_pid)
