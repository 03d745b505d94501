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
import signal
import sys
import threading
import time
import traceback

import msgspec
import zmq

from mmengine.config import EngineConfig
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
    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder(ControlMsg)
    poller = zmq.Poller()
    poller.register(in_sock, zmq.POLLIN)
    while True:
        pending: list[EngineCoreOutput] = []
        timeout = 0 if core.has_unfinished() else 200
        while poller.poll(timeout):
            timeout = 0
            msg = dec.decode(in_sock.recv())
            if msg.kind == "add":
                for r in msg.requests:
                    err = core.add_request(r)
                    if err is not None:
                        pending.append(err)
            elif msg.kind == "abort":
                pending.extend(core.abort_requests(msg.abort_ids))
            elif msg.kind == "stats":
                out_sock.send(
                    enc.encode(EngineCoreOutputs(stats=core.stats(), call_id=msg.call_id))
                )
            elif msg.kind == "reset_prefix_cache":
                ok = core.reset_prefix_cache()
                out_sock.send(enc.encode(EngineCoreOutputs(ok=ok, call_id=msg.call_id)))
            elif msg.kind == "shutdown":
                return
        if core.has_unfinished():
            pending.extend(core.step())
        if pending:
            out_sock.send(enc.encode(EngineCoreOutputs(outputs=pending)))


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
        out_sock.send(enc.encode(EngineCoreOutputs(info=core.info(), call_id=0)))
        serve(core, in_sock, out_sock)
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
