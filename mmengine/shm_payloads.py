"""Large tensor payloads (pixels) between processes through files in /dev/shm.

Without this, an input worker's pixels cross three pipes and ~5 copies: worker -> pool
result pipe -> frontend (decode, re-encode) -> ZMQ -> engine core. The pool has one
result pipe, read by one frontend thread, and on an H100 host it capped W1 preprocessing
at 142 prompts/s whatever the worker count. With a payload file, the worker writes the
bytes once, the messages carry only the file name, and the engine core reads the bytes
once and deletes the file.

Lifecycle (no file may outlive its use):
- the engine core deletes a file as it reads it, and deletes the files of a request it
  refuses before reading them;
- a frontend that drops a processed prompt (validation error, interruption) discards its
  files (`discard_payloads`);
- `PayloadSession.close` (input-worker shutdown) deletes what is left of its session, and
  `sweep_stale` deletes, at start-up, the files of sessions whose process is gone and,
  during a run, files of this session older than a time-to-live.
Where /dev/shm is missing, full or not writable, payloads stay inline in the messages.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
MIN_PAYLOAD_BYTES = 64 * 1024  # smaller tensors stay inline: a file costs more than a copy
STALE_AFTER_S = 600.0  # a payload unread this long belongs to a request that was dropped
DISABLE_ENV = "MMENGINE_DISABLE_SHM"  # "1": always inline (debugging)
_NAME = re.compile(r"mmengine-(\d+)-([0-9a-f]{12})-[0-9a-f]{32}")


class PayloadError(ValueError):
    """A payload file is missing or not what its message says."""


class PayloadSession:
    """Names payload files `mmengine-<pid>-<session>-<random>` and cleans up after them.

    Created in the frontend; the workers get its prefix (`prefix`) and write with
    `write_payload(prefix, data)`.
    """

    def __init__(self, directory: Path = SHM_DIR) -> None:
        self.directory = directory
        self.prefix = f"mmengine-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._last_sweep = time.monotonic()
        sweep_stale(directory)

    def maybe_sweep(self, now: float | None = None, every_s: float = 60.0) -> None:
        """Deletes this session's files older than STALE_AFTER_S, at most once a minute."""
        now = time.monotonic() if now is None else now
        if now - self._last_sweep < every_s:
            return
        self._last_sweep = now
        cutoff = time.time() - STALE_AFTER_S
        for path in self._files():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    logger.warning("deleted an unread shared-memory payload %s", path.name)
            except OSError:
                pass

    def close(self) -> None:
        """Deletes every file of this session."""
        for path in self._files():
            try:
                path.unlink()
            except OSError:
                pass

    def _files(self) -> list[Path]:
        try:
            return list(self.directory.glob(self.prefix + "-*"))
        except OSError:
            return []


def shm_enabled(directory: Path = SHM_DIR) -> bool:
    return (
        os.environ.get(DISABLE_ENV, "0") != "1"
        and directory.is_dir()
        and os.access(directory, os.W_OK)
    )


def write_payload(prefix: str, data: memoryview, directory: Path = SHM_DIR) -> str | None:
    """Writes `data` to a new file readable by this user only; returns its name, or None
    (nothing left behind) when it cannot: the caller then sends the bytes inline."""
    name = f"{prefix}-{uuid.uuid4().hex}"
    path = directory / name
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError:  # ENOSPC on a small /dev/shm: fall back to inline
        try:
            path.unlink()
        except OSError:
            pass
        return None
    return name


def read_payload(name: str, nbytes: int, directory: Path = SHM_DIR) -> bytearray:
    """The bytes of payload `name`, which is deleted (also when it is not as expected).

    Raises:
        PayloadError: a name that is not a payload name, a missing file, or a size other
            than `nbytes`.
    """
    if not _NAME.fullmatch(name):
        raise PayloadError(f"not a payload name: {name!r}")
    path = directory / name
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != nbytes:
                raise PayloadError(f"payload {name} has {size} bytes, expected {nbytes}")
            buf = bytearray(size)
            if f.readinto(buf) != size:
                raise PayloadError(f"payload {name} was cut short")
            return buf
    except FileNotFoundError:
        raise PayloadError(f"payload {name} is gone (dropped as stale, or read twice)") from None
    finally:
        try:
            path.unlink()
        except OSError:
            pass


def discard_payloads(names: list[str], directory: Path = SHM_DIR) -> None:
    """Deletes payload files that will not be read."""
    for name in names:
        if name and _NAME.fullmatch(name):
            try:
                (directory / name).unlink()
            except OSError:
                pass


def sweep_stale(directory: Path = SHM_DIR) -> int:
    """Deletes payload files of sessions whose process no longer exists; returns how many."""
    removed = 0
    try:
        paths = list(directory.glob("mmengine-*"))
    except OSError:
        return 0
    alive: dict[int, bool] = {}
    for path in paths:
        m = _NAME.fullmatch(path.name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid not in alive:
            alive[pid] = _pid_alive(pid)
        if not alive[pid]:
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours to judge
    return True
