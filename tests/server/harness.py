"""Servers for the server tests: in-process apps on one engine, and `mmengine serve` processes.

In-process: one asyncio loop on a background thread runs one ``AsyncLLM`` and any number
of uvicorn servers, each a ``build_app`` with its own flags (allowlists, limits, API
key), on free 127.0.0.1 ports. Starting the engine once keeps the suite fast.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from mmengine.async_llm import AsyncLLM
from mmengine.cli import make_parser
from mmengine.server.api_server import build_app
from mmengine.server.args import engine_config_from_args
from mmengine.server.media import MediaLoader
from processors.config import MediaConfig

T = TypeVar("T")
MODEL_NAME = "tiny"
REPO = Path(__file__).resolve().parents[2]


def engine_argv(ckpt: Path, max_model_len: int = 4096) -> list[str]:
    return [
        str(ckpt),
        "--device", "cpu", "--dtype", "float32",
        "--max-model-len", str(max_model_len),
        "--num-kv-blocks", "2048",
        "--served-model-name", MODEL_NAME,
        "--log-stats-interval-s", "3600",
    ]  # fmt: skip


class ServerHarness:
    """An engine on a background event loop, serving one or more apps.

    ``media_config`` is what the engine's input workers decode (and fetch URLs) under;
    each app's own fetch policy is its ``MediaLoader``.
    """

    def __init__(self, argv: Sequence[str], media_config: MediaConfig | None = None) -> None:
        self.argv = list(argv)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="servers")
        self.thread.start()
        args = make_parser().parse_args(["serve", *self.argv])
        self.engine = AsyncLLM(engine_config_from_args(args), media_config=media_config)
        self.call(self.engine.start(), timeout=120)
        self._servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Runs a coroutine on the servers' loop from the test thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, extra: Sequence[str] = (), media_loader: MediaLoader | None = None) -> str:
        """Starts an app with the engine flags plus ``extra``; returns its base URL."""
        args = make_parser().parse_args(["serve", *self.argv, *extra])

        async def start() -> str:
            app = build_app(self.engine, args, media_loader=media_loader)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            config = uvicorn.Config(
                app, log_config=None, log_level="warning", access_log=False, lifespan="on"
            )
            server = uvicorn.Server(config)
            task = asyncio.create_task(server.serve(sockets=[sock]))
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
            self._servers.append((server, task))
            return f"http://127.0.0.1:{sock.getsockname()[1]}"

        return self.call(start())

    def close(self) -> None:
        async def stop() -> None:
            for server, _ in self._servers:
                server.should_exit = True
            await asyncio.gather(*(t for _, t in self._servers), return_exceptions=True)
            self.engine.shutdown()

        try:
            self.call(stop(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


# ---- metrics ---------------------------------------------------------------------------------
def scrape(url: str) -> dict[str, float]:
    """``name{label="v",...}`` -> value, from a server's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """One sample; label sets only need to include the given labels."""
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def wait_for(predicate: Any, timeout: float, interval: float = 0.05) -> float:
    """Polls until ``predicate()`` is true; returns the seconds it took (fails on timeout)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
    return time.monotonic() - start


# ---- `mmengine serve` as a process -------------------------------------------------------------
class ServerProcess:
    """``python -m mmengine.cli serve ...`` on a free port, its log in a file."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        cmd = [sys.executable, "-m", "mmengine.cli", "serve", *argv, "--port", "0"]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.url = ""

    def wait_ready(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", self.log())
            if m:
                self.url = m.group(1)
                return self.url
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"server not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        return children_of(self.proc.pid)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def close(self) -> None:
        # SIGTERM first: the server then stops its engine core and input workers itself;
        # SIGKILL only if it does not exit (its children still die by PDEATHSIG).
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc; zombies excluded)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
