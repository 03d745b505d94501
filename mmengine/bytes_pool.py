"""A process pool whose results come back as raw bytes and are never unpickled.

``concurrent.futures.ProcessPoolExecutor`` unpickles whatever arrives on its result pipe, so
an input worker taken over through a native decoder bug (FFmpeg, Pillow's codecs) could send
a pickle that runs code in the frontend. Here each worker has its own pipe: tasks go to it
pickled (our own objects, from the trusted side), and results come back with
``Connection.send_bytes`` / ``recv_bytes``: a status byte, then the task's bytes (the input
workers return msgpack), which the caller decodes with msgspec. Nothing from a worker is
unpickled.

The interface is the part of ``ProcessPoolExecutor`` the input workers use: ``submit``
returns a ``concurrent.futures.Future[bytes]``; a worker that dies (or fails its
initializer) breaks the pool as the executor's does: every pending future fails with
``BrokenProcessPool``, the other workers are killed, and later ``submit`` calls raise it;
``shutdown(wait, cancel_futures)``; ``_processes`` maps pid -> process.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection, wait
from typing import Any

logger = logging.getLogger(__name__)

_READY, _FAILED, _RESULT, _ERROR = b"R", b"E", b"O", b"X"
_MAX_ERROR_BYTES = 2000  # a task's exception text, for the frontend's log

Task = tuple[Future, Callable[..., bytes], tuple[Any, ...]]


class BytesProcessPool:
    """``num_workers`` processes of ``mp_context``, each running ``initializer(*initargs)``
    once, then tasks ``fn(*args) -> bytes``. All processes start at once."""

    def __init__(
        self,
        num_workers: int,
        mp_context: Any,
        initializer: Callable[..., None] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        self._mp_context = mp_context
        self._tasks: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._shut_down = False
        self._processes: dict[int, Any] = {}
        self._threads: list[threading.Thread] = []
        for i in range(num_workers):
            parent, child = mp_context.Pipe(duplex=True)
            proc = mp_context.Process(
                target=_worker_main,
                args=(child, initializer, initargs),
                name=f"mm-input-{i}",
                daemon=True,
            )
            proc.start()
            child.close()
            self._processes[proc.pid] = proc
            thread = threading.Thread(
                target=self._serve, args=(proc, parent), name=f"mm-input-io-{i}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        # A worker dying while idle breaks the pool at once (and is reaped), as with the
        # executor: the next submit raises, and the caller moves to a fresh pool before
        # any request is lost to the dead process.
        self._watcher = threading.Thread(target=self._watch, name="mm-input-watch", daemon=True)
        self._watcher.start()

    def submit(self, fn: Callable[..., bytes], *args: Any) -> Future:
        with self._lock:
            if self._broken is not None:
                raise BrokenProcessPool(self._broken)
            if self._shut_down:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: Future = Future()
            self._tasks.put((future, fn, args))
            return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stops taking tasks; each worker exits after its current one. ``wait``: until
        they have; ``cancel_futures``: queued tasks are cancelled, not run."""
        with self._lock:
            self._shut_down = True
        if cancel_futures:
            self._fail_queued(None)
        for _ in self._threads:
            self._tasks.put(None)
        if wait:
            for thread in self._threads:
                thread.join()
            self._watcher.join(10.0)  # it reaps every worker (the only thread that joins them)

    # ---- internals -------------------------------------------------------------------------
    def _serve(self, proc: Any, conn: Connection) -> None:
        """One worker's tasks, one at a time, from the shared queue."""
        try:
            hello = conn.recv_bytes()
        except (EOFError, OSError):
            hello = _FAILED + b"it exited while starting"
        if hello != _READY:
            why = hello[1:_MAX_ERROR_BYTES].decode("utf-8", "replace")
            self._break(f"an input-processing worker failed to start: {why}")
            conn.close()
            return
        while True:
            task = self._tasks.get()
            if task is None or self._broken is not None:
                if task is not None:
                    task[0].set_exception(BrokenProcessPool(self._broken))
                _send_quietly(conn, None)
                break
            future, fn, args = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                conn.send((fn, args))
                status = conn.recv_bytes()
                data = conn.recv_bytes()
            except (EOFError, OSError):
                future.set_exception(BrokenProcessPool("an input-processing worker died"))
                self._break(f"input-processing worker {proc.pid} died during a task")
                break
            except Exception as e:  # the task could not be pickled: only it fails
                future.set_exception(e)
                continue
            if status == _RESULT:
                future.set_result(data)
            else:
                text = data[:_MAX_ERROR_BYTES].decode("utf-8", "replace")
                future.set_exception(RuntimeError(f"input-processing task failed: {text}"))
        conn.close()

    def _watch(self) -> None:
        """Reaps exited workers; one that exits before shutdown breaks the pool. The only
        thread that joins the processes: two threads waiting on one pid race (one reaps it,
        the other's waitpid fails and reads it as still running)."""
        sentinels = {proc.sentinel: proc for proc in self._processes.values()}
        while sentinels:
            for sentinel in wait(list(sentinels), timeout=1.0):
                proc = sentinels.pop(sentinel)
                proc.join(1.0)  # its pipes close a moment before it can be reaped
                if not self._shut_down:
                    self._break(
                        f"input-processing worker {proc.pid} died (exit code {proc.exitcode})"
                    )

    def _break(self, why: str) -> None:
        """A worker died: as ProcessPoolExecutor does, fail everything and stop them all."""
        with self._lock:
            if self._broken is not None:
                return
            self._broken = why
        logger.error("%s", why)
        self._fail_queued(BrokenProcessPool(why))
        for proc in self._processes.values():
            if proc.exitcode is None:
                proc.kill()  # their serving threads see EOF and fail their tasks
        for _ in self._threads:
            self._tasks.put(None)

    def _fail_queued(self, error: BaseException | None) -> None:
        """Fails (or, with None, cancels) every task still queued; keeps the stop markers."""
        markers = 0
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is None:
                markers += 1
            elif error is None:
                task[0].cancel()
            elif task[0].set_running_or_notify_cancel():
                task[0].set_exception(error)
        for _ in range(markers):
            self._tasks.put(None)


def _send_quietly(conn: Connection, obj: Any) -> None:
    try:
        conn.send(obj)
    except (OSError, ValueError):
        pass


def _worker_main(
    conn: Connection, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]
) -> None:
    """A worker: the initializer, then tasks until a None (or the frontend's pipe closes)."""
    # Ctrl-C reaches the whole process group: the frontend decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if initializer is not None:
            initializer(*initargs)
    except BaseException as e:  # noqa: BLE001 - reported to the frontend, then exit
        conn.send_bytes(_FAILED + f"{type(e).__name__}: {e}".encode())
        return
    conn.send_bytes(_READY)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        fn, args = task
        try:
            out = fn(*args)
            if not isinstance(out, bytes):
                raise TypeError(f"a task must return bytes, not {type(out).__name__}")
        except BaseException as e:  # noqa: BLE001 - the frontend fails this task only
            conn.send_bytes(_ERROR)
            conn.send_bytes(f"{type(e).__name__}: {e}".encode())
            continue
        conn.send_bytes(_RESULT)
        conn.send_bytes(out)
