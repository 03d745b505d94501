"""The engine core as a child process, driven from an asyncio event loop.

Same process and wire protocol as ``MPClient`` (``python -m mmengine.core_process``,
msgpack over ``ipc://`` PUSH/PULL sockets in a private 0700 temp dir), but with
``zmq.asyncio`` sockets so that waiting for outputs never blocks the server's event loop.
Exactly one task may call :meth:`AsyncCoreClient.recv`; sends are fire-and-forget.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import shutil
import subprocess

import msgspec
import zmq
import zmq.asyncio

from mmengine.config import EngineConfig
from mmengine.core_client import EngineDeadError, spawn_core_process, wait_until_ready
from mmengine.messages import ControlMsg, EngineCoreOutputs, EngineInfo

logger = logging.getLogger(__name__)


class AsyncCoreClient:
    """Starts the engine-core process and exchanges messages with it asynchronously."""

    def __init__(self, config: EngineConfig) -> None:
        """Binds the sockets and spawns the process; call :meth:`wait_ready` next.

        Must run on the thread that will outlive the engine: the child asks the kernel to
        kill it when its parent *thread* exits (PR_SET_PDEATHSIG).
        """
        self._closed = False
        self._ctx = zmq.asyncio.Context()
        core = spawn_core_process(config, self._ctx)
        self._proc, self._tmpdir = core.proc, core.tmpdir
        self._in: zmq.asyncio.Socket = core.input  # type: ignore[assignment]
        self._out: zmq.asyncio.Socket = core.output  # type: ignore[assignment]
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(EngineCoreOutputs)
        self.info: EngineInfo | None = None
        self._handshake: concurrent.futures.Future[EngineInfo] | None = None

    async def wait_ready(self, timeout_s: float) -> EngineInfo:
        """Waits for the engine's ready message (the model is loaded, KV allocated).

        The handshake is ``MPClient``'s, run on a worker thread over a plain shadow of the
        output socket: nothing else reads that socket until it returns, and the event
        loop stays free while the model loads.
        """
        sync_out = zmq.Socket.shadow(self._out.underlying)
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="core-handshake")
        self._handshake = pool.submit(wait_until_ready, sync_out, self._proc, timeout_s)
        pool.shutdown(wait=False)
        self.info = await asyncio.wrap_future(self._handshake)
        return self.info

    # ---- traffic ---------------------------------------------------------------------------
    def send(self, msg: ControlMsg) -> None:
        """Queues a control message without waiting (PUSH to a live peer does not block)."""
        self.check_alive()
        fut = self._in.send(self._enc.encode(msg), copy=False)
        if not fut.done():  # only at the high-water mark: finish in the background
            fut.add_done_callback(_log_send_failure)
        elif fut.exception() is not None:
            raise EngineDeadError("could not send to the engine core") from fut.exception()

    async def recv(self, timeout_s: float) -> EngineCoreOutputs | None:
        """The next message from the engine, or None after ``timeout_s`` of silence.

        Raises:
            EngineDeadError: the engine reported a fatal error or its process exited.
        """
        if await self._out.poll(int(timeout_s * 1000)) == 0:
            self.check_alive()
            return None
        frame = await self._out.recv(copy=False)
        msg = self._dec.decode(frame.buffer)
        if msg.dead is not None:
            raise EngineDeadError(f"the engine core failed: {msg.dead}")
        return msg

    def check_alive(self) -> None:
        if self._closed:
            raise EngineDeadError("the engine has been shut down")
        code = self._proc.poll()
        if code is not None:
            raise EngineDeadError(f"the engine core process exited with code {code}")

    def alive(self) -> bool:
        return not self._closed and self._proc.poll() is None

    @property
    def pid(self) -> int:
        return self._proc.pid

    # ---- shutdown --------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stops the process (politely, then SIGTERM, then SIGKILL) and frees the sockets.

        Synchronous so it also works at interpreter exit; blocks at most ~timeout_s + 5 s.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._proc.poll() is None:
                # A plain shadow socket: this may run where no event loop is running.
                with contextlib.suppress(zmq.ZMQError):
                    sync_in = zmq.Socket.shadow(self._in.underlying)
                    sync_in.send(self._enc.encode(ControlMsg(kind="shutdown")), zmq.NOBLOCK)
                _wait_or_kill(self._proc, timeout_s)
            if self._handshake is not None:
                # A cancelled start: the handshake thread still polls the output socket.
                # It sees the process gone within one poll; closing the socket under it
                # first could abort inside libzmq.
                concurrent.futures.wait([self._handshake], timeout=2.0)
        finally:
            self._in.close(0)
            self._out.close(0)
            self._ctx.term()
            shutil.rmtree(self._tmpdir, ignore_errors=True)


def _wait_or_kill(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    try:
        proc.wait(timeout_s)
        return
    except subprocess.TimeoutExpired:
        proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _log_send_failure(fut: asyncio.Future[object]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        logger.warning("sending to the engine core failed: %s", fut.exception())
