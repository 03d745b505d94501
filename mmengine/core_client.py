"""How the frontend talks to the engine core: in-process, or a child process over ZMQ.

The child is a fresh interpreter (``python -m mmengine.core_process``), so user scripts
need no ``if __name__ == "__main__"`` guard and nothing is pickled: messages are msgpack
(msgspec structs) over ``ipc://`` sockets in a private temporary directory.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import msgspec
import zmq

from mmengine.config import EngineConfig
from mmengine.messages import (
    ControlMsg,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineInfo,
    EngineStats,
)

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine core stopped; no more requests can be served."""


@dataclass
class CoreProcess:
    """A started engine-core child and the two sockets bound for it.

    The sockets come from the caller's context, so they are plain ``zmq`` sockets for
    ``MPClient`` and ``zmq.asyncio`` ones for ``AsyncCoreClient``.
    """

    proc: subprocess.Popen[bytes]
    input: zmq.Socket  # PUSH: control messages to the core
    output: zmq.Socket  # PULL: outputs from the core
    tmpdir: str  # private 0700 directory of the ipc:// sockets; remove it after closing


GPU_CORE_THREADS = 4


def default_core_threads(config: EngineConfig) -> int:
    """torch CPU threads of the engine-core process when the user set none.

    On a GPU the core's CPU work is small (packing pixels into pinned memory, index
    tensors), while the input workers and the frontend keep the other cores busy: with
    torch's default of one thread per core, its parallel regions waited on preempted
    threads. W1 on an H200 (16 cores, 8 input workers): 38.8 req/s with 16 threads, 41.6
    with 4, 41.1 with 1 (two runs each); the last prompt also reached the engine sooner
    (0.63 s vs 0.75-1.04 s). On the CPU the core inherits the frontend's setting (the
    forward runs there; on a small shared CPU torch's default can be 20x slower).
    """
    import torch

    threads = torch.get_num_threads()
    on_gpu = config.device.startswith("cuda") or (
        config.device == "auto" and torch.cuda.is_available()
    )
    return min(threads, GPU_CORE_THREADS) if on_gpu else threads


def spawn_core_process(config: EngineConfig, ctx: zmq.Context) -> CoreProcess:
    """Binds the ipc sockets and starts ``python -m mmengine.core_process``.

    The child asks the kernel to kill it when the *thread* that spawned it exits
    (PR_SET_PDEATHSIG), so call this on a thread that outlives the engine.
    """
    tmpdir = tempfile.mkdtemp(prefix="mmengine-")
    os.chmod(tmpdir, 0o700)  # only this user may connect to the ipc sockets
    in_addr = f"ipc://{tmpdir}/input"
    out_addr = f"ipc://{tmpdir}/output"
    in_sock = ctx.socket(zmq.PUSH)
    in_sock.setsockopt(zmq.LINGER, 0)
    in_sock.bind(in_addr)
    out_sock = ctx.socket(zmq.PULL)
    out_sock.setsockopt(zmq.LINGER, 0)
    out_sock.bind(out_addr)
    env = dict(os.environ)
    cfg = config.to_dict()
    if cfg.get("cpu_threads") is None:
        cfg["cpu_threads"] = default_core_threads(config)
    env["MMENGINE_CORE_CONFIG"] = json.dumps(cfg)
    cmd = [
        sys.executable,
        "-m",
        "mmengine.core_process",
        "--input",
        in_addr,
        "--output",
        out_addr,
        "--parent-pid",
        str(os.getpid()),
    ]
    try:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
    except BaseException:
        in_sock.close(0)
        out_sock.close(0)
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return CoreProcess(proc, in_sock, out_sock, tmpdir)


def wait_until_ready(
    out_sock: zmq.Socket, proc: subprocess.Popen[bytes], timeout_s: float
) -> EngineInfo:
    """The start-up handshake: blocks until the core sends its ready message.

    The ready message is the first thing a core sends (``call_id`` 0 with its
    ``EngineInfo``); before it, a fatal error arrives as ``dead``, or the process exits.

    Raises:
        EngineDeadError: the core reported a failure or its process exited.
        TimeoutError: nothing within ``timeout_s``.
    """
    decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not out_sock.poll(200):
            code = proc.poll()
            if code is not None:
                raise EngineDeadError(f"the engine core process failed to start (exit code {code})")
            continue
        msg = decoder.decode(out_sock.recv(copy=False).buffer)
        if msg.dead is not None:
            raise EngineDeadError(f"the engine core failed: {msg.dead}")
        if msg.call_id == 0 and msg.info is not None:
            return msg.info
    raise TimeoutError(f"the engine core did not answer within {timeout_s:.0f}s")


class InprocClient:
    """Runs the engine core in this process (for debugging and profiling)."""

    def __init__(self, config: EngineConfig) -> None:
        from mmengine.engine_core import EngineCore

        self.core = EngineCore(config)
        self._pending: list[EngineCoreOutput] = []
        self.info = self.core.info()
        self.max_model_len = self.info.max_model_len
        self.vocab_size = self.info.vocab_size

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        for r in requests:
            err = self.core.add_request(r)
            if err is not None:
                self._pending.append(err)

    def abort(self, request_ids: list[str]) -> None:
        self._pending.extend(self.core.abort_requests(request_ids))

    def get_outputs(self, timeout_s: float = 1.0) -> list[EngineCoreOutput]:
        outs, self._pending = self._pending, []
        if self.core.has_unfinished():
            outs.extend(self.core.step())
        return outs

    def stats(self) -> EngineStats:
        return self.core.stats()

    def reset_prefix_cache(self) -> bool:
        return self.core.reset_prefix_cache()

    def start_profile(self, path: str) -> None:
        self.core.start_profile(path)

    def stop_profile(self) -> None:
        self.core.stop_profile()

    def shutdown(self) -> None:
        self.core.close()


class MPClient:
    """Starts the engine core in a child process and talks to it over ZMQ."""

    def __init__(self, config: EngineConfig, startup_timeout_s: float = 900.0) -> None:
        self._closed = False
        self._ctx = zmq.Context()
        core = spawn_core_process(config, self._ctx)
        self._proc, self._in, self._out, self._tmpdir = (
            core.proc,
            core.input,
            core.output,
            core.tmpdir,
        )
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(EngineCoreOutputs)
        self._pending: list[EngineCoreOutput] = []
        self._call_ids = itertools.count(1)
        try:
            self.info = wait_until_ready(self._out, self._proc, startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self.max_model_len = self.info.max_model_len
        self.vocab_size = self.info.vocab_size

    # ---- sending ---------------------------------------------------------------------------
    def _send(self, msg: ControlMsg) -> None:
        self._check_alive()
        self._in.send(self._enc.encode(msg), copy=False)

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        self._send(ControlMsg(kind="add", requests=requests))

    def abort(self, request_ids: list[str]) -> None:
        if request_ids and not self._closed:
            self._send(ControlMsg(kind="abort", abort_ids=list(request_ids)))

    # ---- receiving -------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._closed:
            raise EngineDeadError("the engine has been shut down")
        code = self._proc.poll()
        if code is not None:
            raise EngineDeadError(f"the engine core process exited with code {code}")

    def _recv(self, timeout_s: float) -> EngineCoreOutputs | None:
        if not self._out.poll(int(timeout_s * 1000)):
            return None
        msg = self._dec.decode(self._out.recv(copy=False).buffer)
        if msg.dead is not None:
            raise EngineDeadError(f"the engine core failed: {msg.dead}")
        return msg

    def get_outputs(self, timeout_s: float = 1.0) -> list[EngineCoreOutput]:
        if self._pending:
            outs, self._pending = self._pending, []
            return outs
        msg = self._recv(timeout_s)
        if msg is None:
            self._check_alive()
            return []
        return list(msg.outputs)

    def _wait_for_call(self, call_id: int, timeout_s: float) -> EngineCoreOutputs:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self._recv(0.2)
            if msg is None:
                code = self._proc.poll()
                if code is not None:
                    raise EngineDeadError(f"the engine core process exited (exit code {code})")
                continue
            if msg.call_id == call_id:
                return msg
            self._pending.extend(msg.outputs)
        raise TimeoutError(f"the engine core did not answer within {timeout_s:.0f}s")

    def _call(
        self, kind: str, path: str | None = None, timeout_s: float = 60.0
    ) -> EngineCoreOutputs:
        call_id = next(self._call_ids)
        self._send(ControlMsg(kind=kind, call_id=call_id, path=path))
        return self._wait_for_call(call_id, timeout_s)

    def stats(self) -> EngineStats:
        reply = self._call("stats")
        assert reply.stats is not None
        return reply.stats

    def reset_prefix_cache(self) -> bool:
        return self._call("reset_prefix_cache").ok

    def start_profile(self, path: str) -> None:
        reply = self._call("start_profile", path=path)
        if not reply.ok:
            raise RuntimeError(reply.error)

    def stop_profile(self) -> None:
        # Writing a trace of many steps' kernels takes a while.
        reply = self._call("stop_profile", timeout_s=600.0)
        if not reply.ok:
            raise RuntimeError(reply.error)

    # ---- shutdown --------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._proc.poll() is None:
                try:
                    # Never block: a core that is alive but no longer reading (it failed
                    # and is tearing down) has no peer socket, and a PUSH send would
                    # wait forever. The timeout, terminate and kill below cover it.
                    self._in.send(self._enc.encode(ControlMsg(kind="shutdown")), zmq.NOBLOCK)
                except zmq.Again:
                    pass
                try:
                    self._proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self._proc.terminate()
                    try:
                        self._proc.wait(5)
                    except subprocess.TimeoutExpired:
                        self._proc.kill()
                        self._proc.wait()
        finally:
            self._in.close(0)
            self._out.close(0)
            self._ctx.term()
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    @property
    def pid(self) -> int:
        return self._proc.pid


def make_client(config: EngineConfig) -> InprocClient | MPClient:
    return MPClient(config) if config.multiprocess else InprocClient(config)
