"""The engine core as a child process, driven from an asyncio event loop.

Same process and wire protocol as ``MPClient`` (``python -m mmengine.core_process``,
msgpack over ``ipc://`` PUSH/PULL sockets in a private 0700 temp dir), but with
``zmq.asyncio`` sockets so that waiting for outputs never blocks the server's event loop.
Exactly one task may call :meth:`AsyncCoreClient.recv`; sends are fire-and-forget.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

import msgspec
import zmq
import zmq.asyncio

from mmengine.config import EngineConfig
from mmengine.core_client import EngineDeadError
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
        self._tmpdir = tempfile.mkdtemp(prefix="mmengine-")
        os.chmod(self._tmpdir, 0o700)  # only this user may connect to the ipc sockets
        in_addr = f"ipc://{self._tmpdir}/input"
        out_addr = f"ipc://{self._tmpdir}/output"
        self._ctx = zmq.asyncio.Context()
        self._in = self._ctx.socket(zmq.PUSH)
        self._in.setsockopt(zmq.LINGER, 0)
        self._in.bind(in_addr)
        self._out = self._ctx.socket(zmq.PULL)
        self._out.setsockopt(zmq.LINGER, 0)
        self._out.bind(out_addr)
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(EngineCoreOutputs)
        env = dict(os.environ)
        env["MMENGINE_CORE_CONFIG"] = json.dumps(config.to_dict())
        cmd = [sys.executable, "-m", "mmengine.core_process", "--input", in_addr]
        cmd += ["--output", out_addr, "--parent-pid", str(os.getpid())]
        self._proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        self.info: EngineInfo | None = None

    async def wait_ready(self, timeout_s: float) -> EngineInfo:
        """Waits for the engine's ready message (the model is loaded, KV allocated)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = await self.recv(0.2)
            if msg is not None and msg.info is not None and msg.call_id == 0:
                self.info = msg.info
                return msg.info
        raise TimeoutError(f"the engine core did not start within {timeout_s:.0f}s")

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
