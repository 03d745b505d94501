"""MPClient.shutdown never hangs, whatever state the core process is in."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading

import msgspec
import zmq

from mmengine.core_client import MPClient


def _client_with_silent_core() -> MPClient:
    """An MPClient whose 'core' is alive but has no socket connected (a core that failed
    and is tearing down): a blocking PUSH send to it would wait forever."""
    client = MPClient.__new__(MPClient)
    client._closed = False
    client._ctx = zmq.Context()
    client._tmpdir = tempfile.mkdtemp(prefix="mmengine-test-")
    client._in = client._ctx.socket(zmq.PUSH)
    client._in.setsockopt(zmq.LINGER, 0)
    client._in.bind(f"ipc://{client._tmpdir}/input")
    client._out = client._ctx.socket(zmq.PULL)
    client._out.setsockopt(zmq.LINGER, 0)
    client._out.bind(f"ipc://{client._tmpdir}/output")
    client._enc = msgspec.msgpack.Encoder()
    client._proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    return client


def test_shutdown_returns_when_the_core_is_alive_but_not_reading():
    client = _client_with_silent_core()
    done = threading.Event()
    thread = threading.Thread(
        target=lambda: (client.shutdown(timeout_s=0.5), done.set()), daemon=True
    )
    thread.start()
    try:
        assert done.wait(20), "shutdown hung on a core that does not read its socket"
        assert client._proc.poll() is not None, "the core process was left running"
    finally:
        if client._proc.poll() is None:
            client._proc.kill()
        shutil.rmtree(client._tmpdir, ignore_errors=True)
