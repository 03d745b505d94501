"""Entry point of the engine-core child process: ``python -m mmengine.core_process``.

Reads control messages from the frontend, steps the engine while there is work, and
pushes outputs back. Exits when told to, when the frontend process disappears, or after
reporting a fatal error.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback

import msgspec
import zmq

from mmengine.config import EngineConfig
from mmengine.gc_heap import freeze_startup_heap
from mmengine.messages import ControlMsg, EngineCoreOutput, EngineCoreOutputs

logger = logging.getLogger("mmengine.core")


def _die_with_parent(parent_pid: int) -> None:
    try:  # Linux: the kernel kills us when the parent dies
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass

    def watch() -> None:  # portable fallback: poll the parent
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def serve(core, in_sock: zmq.Socket, out_sock: zmq.Socket) -> None:  # noqa: ANN001
    """The engine loop: apply what the input thread queued, then step.

    The input thread receives, decodes and builds requests (reading their pixel payloads,
    milliseconds per large image) while this loop steps: a burst of image prompts then no
    longer holds back the next step while the GPU waits.
    """
    enc = msgspec.msgpack.Encoder()
    inbox: queue.Queue = queue.Queue()
    stop = threading.Event()
    reader = threading.Thread(
        target=_receive, args=(core, in_sock, inbox, stop), daemon=True, name="core-input"
    )
    reader.start()
    try:
        while True:
            pending: list[EngineCoreOutput] = []
            wait = not core.has_unfinished()
            while True:
                try:
                    kind, payload = inbox.get(timeout=0.2) if wait else inbox.get_nowait()
                except queue.Empty:
                    break
                wait = False
                if kind == "add":
                    for req in payload:
                        err = req if isinstance(req, EngineCoreOutput) else core.add_prepared(req)
                        if err is not None:
                            pending.append(err)
                elif kind == "abort":
                    pending.extend(core.abort_requests(payload.abort_ids))
                elif kind == "stats":
                    out = EngineCoreOutputs(stats=core.stats(), call_id=payload.call_id)
                    out_sock.send(enc.encode(out))
                elif kind == "reset_prefix_cache":
                    ok = core.reset_prefix_cache()
                    out_sock.send(enc.encode(EngineCoreOutputs(ok=ok, call_id=payload.call_id)))
                elif kind in ("start_profile", "stop_profile"):
                    reply = EngineCoreOutputs(call_id=payload.call_id, ok=True)
                    try:
                        if kind == "start_profile":
                            core.start_profile(payload.path)
                        else:
                            core.stop_profile()
                    except Exception as e:  # a bad path or no profile: the caller's error
                        reply = EngineCoreOutputs(call_id=payload.call_id, ok=False, error=str(e))
                    out_sock.send(enc.encode(reply))
                elif kind == "shutdown":
                    return
                elif kind == "failed":
                    raise payload  # the input thread could not go on: the core dies loudly
            if core.has_unfinished():
                pending.extend(core.step())
            if pending:
                out_sock.send(enc.encode(EngineCoreOutputs(outputs=pending)))
    finally:
        stop.set()
        reader.join(timeout=5)


def _receive(core, in_sock: zmq.Socket, inbox: queue.Queue, stop: threading.Event) -> None:  # noqa: ANN001
    """Input thread: owns `in_sock`; queues (kind, payload) for the engine loop, in order.

    "add" carries built requests (or their error outputs); any failure other than a bad
    request is queued as "failed" and ends the thread.
    """
    dec = msgspec.msgpack.Decoder(ControlMsg)
    try:
        while not stop.is_set():
            if not in_sock.poll(100):
                continue
            msg = dec.decode(in_sock.recv())
            if msg.kind == "add":
                inbox.put(("add", [core.make_request(r) for r in msg.requests]))
            else:
                inbox.put((msg.kind, msg))
            if msg.kind == "shutdown":
                return
    except BaseException as e:
        inbox.put(("failed", e))


def main() -> None:
    ap = argparse.ArgumentParser(description="mmengine engine-core process (started by mmengine)")
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--parent-pid", type=int, required=True)
    args = ap.parse_args()
    logging.basicConfig(
        level=os.environ.get("MMENGINE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s [engine-core] %(message)s",
        stream=sys.stderr,
    )
    _die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the frontend decides when we stop
    ctx = zmq.Context()
    in_sock = ctx.socket(zmq.PULL)
    in_sock.connect(args.input)
    out_sock = ctx.socket(zmq.PUSH)
    out_sock.setsockopt(zmq.LINGER, 2000)
    out_sock.connect(args.output)
    enc = msgspec.msgpack.Encoder()
    code = 0
    try:
        from mmengine.engine_core import EngineCore

        config = EngineConfig(**json.loads(os.environ["MMENGINE_CORE_CONFIG"]))
        if config.cpu_threads:
            import torch

            torch.set_num_threads(config.cpu_threads)
        core = EngineCore(config)
        freeze_startup_heap()  # this process lives as long as its engine (mmengine/gc_heap.py)
        out_sock.send(enc.encode(EngineCoreOutputs(info=core.info(), call_id=0)))
        try:
            serve(core, in_sock, out_sock)
        finally:
            core.close()
    except Exception as e:  # report, then exit non-zero: the frontend raises EngineDeadError
        logger.error("engine core failed:\n%s", traceback.format_exc())
        out_sock.send(enc.encode(EngineCoreOutputs(dead=f"{type(e).__name__}: {e}")))
        code = 1
    finally:
        in_sock.close(0)
        out_sock.close()
        ctx.term()
    sys.exit(code)


if __name__ == "__main__":
    main()
