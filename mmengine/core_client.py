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

import msgspec
import zmq

from mmengine.config import EngineConfig
from mmengine.messages import (
    ControlMsg,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
)

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine core stopped; no more requests can be served."""


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

    def shutdown(self) -> None:
        pass


class MPClient:
    """Starts the engine core in a child process and talks to it over ZMQ."""

    def __init__(self, config: EngineConfig, startup_timeout_s: float = 900.0) -> None:
        self._closed = False
        self._tmpdir = tempfile.mkdtemp(prefix="mmengine-")
        os.chmod(self._tmpdir, 0o700)
        in_addr = f"ipc://{self._tmpdir}/input"
        out_addr = f"ipc://{self._tmpdir}/output"
        self._ctx = zmq.Context()
        self._in = self._ctx.socket(zmq.PUSH)
        self._in.setsockopt(zmq.LINGER, 0)
        self._in.bind(in_addr)
        self._out = self._ctx.socket(zmq.PULL)
        self._out.setsockopt(zmq.LINGER, 0)
        self._out.bind(out_addr)
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(EngineCoreOutputs)
        self._pending: list[EngineCoreOutput] = []
        self._call_ids = itertools.count(1)
        env = dict(os.environ)
        env["MMENGINE_CORE_CONFIG"] = json.dumps(config.to_dict())
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
        self._proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        try:
            ready = self._wait_for_call(0, startup_timeout_s, starting=True)
        except BaseException:
            self.shutdown()
            raise
        assert ready.info is not None
        self.info = ready.info
        self.max_model_len = ready.info.max_model_len
        self.vocab_size = ready.info.vocab_size

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

    def _wait_for_call(
        self, call_id: int, timeout_s: float, starting: bool = False
    ) -> EngineCoreOutputs:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self._recv(0.2)
            if msg is None:
                code = self._proc.poll()
                if code is not None:
                    what = "failed to start" if starting else "exited"
                    raise EngineDeadError(f"the engine core process {what} (exit code {code})")
                continue
            if msg.call_id == call_id:
                return msg
            self._pending.extend(msg.outputs)
        raise TimeoutError(f"the engine core did not answer within {timeout_s:.0f}s")

    def _call(self, kind: str) -> EngineCoreOutputs:
        call_id = next(self._call_ids)
        self._send(ControlMsg(kind=kind, call_id=call_id))
        return self._wait_for_call(call_id, 60.0)

    def stats(self) -> EngineStats:
        reply = self._call("stats")
        assert reply.stats is not None
        return reply.stats

    def reset_prefix_cache(self) -> bool:
        return self._call("reset_prefix_cache").ok

    # ---- shutdown --------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._proc.poll() is None:
                self._in.send(self._enc.encode(ControlMsg(kind="shutdown")))
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
