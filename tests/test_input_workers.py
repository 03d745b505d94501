"""InputWorkers start-up: every worker process is running and initialized before the
first request, also when the pool spawns its processes (the default once CUDA is up)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmengine.bytes_pool import BytesProcessPool
from mmengine.input_processor import InputWorkers
from mmengine.model_loader import read_config


def _pool_processes(workers: InputWorkers) -> dict:
    return dict(workers._pool._processes or {})  # noqa: SLF001


def test_start_brings_up_every_spawned_worker_before_the_first_request(
    monkeypatch: pytest.MonkeyPatch, qwen2_vl_ckpt: Path
) -> None:
    # The engine spawns (not forks) its workers once CUDA is initialized: each is a fresh
    # interpreter importing torch, so start() waits until every one has initialized.
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    workers = InputWorkers(qwen2_vl_ckpt, read_config(qwen2_vl_ckpt), None, None, torch.float32, 3)
    try:
        assert workers._pool._mp_context.get_start_method() == "spawn"  # noqa: SLF001
        workers.start(timeout_s=180)
        procs = _pool_processes(workers)
        assert len(procs) == 3 and all(p.is_alive() for p in procs.values())
        futures = [f for _ in range(3) for f in workers.launch()]
        pids = {int(f.result(timeout=30)) for f in futures}
        assert pids <= set(procs)  # tasks run in those processes, all initialized
    finally:
        workers.shutdown()
    assert not any(p.is_alive() for p in procs.values())


def test_start_reports_a_worker_that_cannot_initialize(tmp_path: Path) -> None:
    # A folder with no processor files: the workers' initializer raises.
    cfg = {"model_type": "qwen2_vl", "vision_config": {}}
    workers = InputWorkers(tmp_path, cfg, None, None, torch.float32, 1)
    try:
        with pytest.raises(RuntimeError, match="did not start"):
            workers.start(timeout_s=60)
    finally:
        workers.shutdown()


def test_start_gives_up_when_one_worker_never_comes_up_while_the_others_answer(
    monkeypatch: pytest.MonkeyPatch, qwen2_vl_ckpt: Path
) -> None:
    import multiprocessing as mp

    workers = InputWorkers(qwen2_vl_ckpt, read_config(qwen2_vl_ckpt), None, None, torch.float32, 2)
    workers._pool.shutdown()  # noqa: SLF001 - replaced by a pool whose second worker hangs
    hung = mp.get_context("fork").Event()

    def init(_args: dict) -> None:
        import time

        if hung.is_set():
            time.sleep(3600)  # the second process never finishes starting
        hung.set()

    workers._pool = BytesProcessPool(  # noqa: SLF001
        2, mp_context=mp.get_context("fork"), initializer=init, initargs=({},)
    )
    try:
        with pytest.raises(RuntimeError, match="1 of 2 within 3 s"):
            workers.start(timeout_s=3)
    finally:
        for proc in (workers._pool._processes or {}).values():  # noqa: SLF001
            proc.kill()
        workers.shutdown()
