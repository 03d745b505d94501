"""Pixel payloads through /dev/shm: round trips, refusals, and no file outliving its use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmengine.messages as messages
from mmengine import SamplingParams
from mmengine.shm_payloads import (
    PayloadError,
    PayloadSession,
    discard_payloads,
    read_payload,
    shm_enabled,
    sweep_stale,
    write_payload,
)
from tests.test_mm_parity import _img, cases, engine_run, hf_refs

torch.set_num_threads(1)


@pytest.fixture()
def session(tmp_path: Path) -> PayloadSession:
    return PayloadSession(tmp_path)


def test_a_payload_is_read_once_and_its_file_deleted(session: PayloadSession) -> None:
    data = bytes(range(256)) * 10
    name = write_payload(session.prefix, memoryview(data), session.directory)
    assert name is not None
    path = session.directory / name
    assert path.stat().st_mode & 0o777 == 0o600  # readable by this user only
    assert bytes(read_payload(name, len(data), session.directory)) == data
    assert not path.exists()
    with pytest.raises(PayloadError, match="gone"):
        read_payload(name, len(data), session.directory)


def test_a_payload_of_the_wrong_size_is_refused_and_still_deleted(session: PayloadSession) -> None:
    name = write_payload(session.prefix, memoryview(b"x" * 100), session.directory)
    with pytest.raises(PayloadError, match="expected 99"):
        read_payload(name, 99, session.directory)
    assert not (session.directory / name).exists()


@pytest.mark.parametrize("name", ["../etc/passwd", "mmengine-1-abc", "/dev/shm/x", ""])
def test_names_that_are_not_payload_names_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(PayloadError, match="not a payload name"):
        read_payload(name, 1, tmp_path)


def test_writing_where_it_cannot_gives_none_and_leaves_nothing(tmp_path: Path) -> None:
    assert write_payload("mmengine-1-000000000000", memoryview(b"x"), tmp_path / "nope") is None
    assert not shm_enabled(tmp_path / "nope")


def test_big_tensors_travel_as_payloads_small_ones_inline(
    session: PayloadSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mmengine.shm_payloads.SHM_DIR", session.directory)
    for fn in ("write_payload", "read_payload"):
        real = getattr(messages, fn)
        monkeypatch.setattr(
            messages, fn, lambda *a, _real=real: _real(*a, directory=session.directory)
        )
    big = torch.randint(0, 256, (300, 1176), dtype=torch.uint8)
    small = torch.arange(12, dtype=torch.int64).view(3, 4)
    m_big = messages.tensor_to_msg(big, session.prefix)
    m_small = messages.tensor_to_msg(small, session.prefix)
    assert m_big.shm and m_big.data == b""
    assert not m_small.shm and m_small.data
    assert torch.equal(messages.msg_to_tensor(m_big), big)
    assert torch.equal(messages.msg_to_tensor(m_small), small)
    assert list(session.directory.iterdir()) == []


def test_sweeps_delete_dead_sessions_stale_files_and_a_closed_session(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    orphan = tmp_path / f"mmengine-{dead_pid}-{'a' * 12}-{'b' * 32}"
    orphan.write_bytes(b"x")
    session = PayloadSession(tmp_path)  # sweeps dead sessions as it starts
    assert not orphan.exists()
    fresh = write_payload(session.prefix, memoryview(b"y"), tmp_path)
    old = write_payload(session.prefix, memoryview(b"z"), tmp_path)
    os.utime(tmp_path / old, (1, 1))  # unread since 1970
    session.maybe_sweep(now=1e12)
    assert (tmp_path / fresh).exists() and not (tmp_path / old).exists()
    other = PayloadSession(tmp_path)
    kept = write_payload(other.prefix, memoryview(b"k"), tmp_path)
    assert sweep_stale(tmp_path) == 0  # live sessions are left alone
    session.close()
    assert not (tmp_path / fresh).exists() and (tmp_path / kept).exists()
    discard_payloads([kept, "../not-ours"], tmp_path)
    assert list(tmp_path.iterdir()) == []


def _our_files() -> list[Path]:
    return sorted(Path("/dev/shm").glob(f"mmengine-{os.getpid()}-*"))


@pytest.mark.skipif(not shm_enabled(), reason="no writable /dev/shm")
@pytest.mark.parametrize("multiprocess", [False, True], ids=["inproc", "multiprocess"])
def test_every_item_through_shm_gives_hf_tokens_and_leaves_no_files(
    qwen2_vl_ckpt: Path, monkeypatch: pytest.MonkeyPatch, multiprocess: bool
) -> None:
    # Every pixel tensor goes through a payload file (the fixture's are below the
    # threshold); the workers fork after the patch, so they see it too.
    monkeypatch.setattr(messages, "MIN_PAYLOAD_BYTES", 1)
    _, prompt_ids, refs = hf_refs(qwen2_vl_ckpt, "qwen2_vl")
    outs, stats = engine_run(qwen2_vl_ckpt, "qwen2_vl", multiprocess=multiprocess)
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert stats["encoder_items"] > 0
    assert _our_files() == []


@pytest.mark.skipif(not shm_enabled(), reason="no writable /dev/shm")
def test_refused_and_n_gt_1_requests_leave_no_files(
    qwen2_vl_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmengine import LLM

    monkeypatch.setattr(messages, "MIN_PAYLOAD_BYTES", 1)
    texts, prompt_ids, refs = hf_refs(qwen2_vl_ckpt, "qwen2_vl")
    c = cases("qwen2_vl")[0]
    req = {"prompt": texts[0], "multi_modal_data": {"image": c["images"]}}
    big = {"prompt": texts[0], "multi_modal_data": {"image": [_img(9, 400, 400)]}}
    max_len = len(prompt_ids[0]) + 12
    with LLM(str(qwen2_vl_ckpt), dtype="float32", device="cpu", max_model_len=max_len) as llm:
        # n = 2: both completions read the one payload file of the prompt.
        out = llm.generate(req, SamplingParams(temperature=0, max_tokens=10, n=2), use_tqdm=False)[
            0
        ]
        assert [c.token_ids for c in out.outputs] == [refs[0], refs[0]]
        # A prompt refused after its media was processed: the bigger image makes it
        # longer than max_model_len.
        with pytest.raises(ValueError, match="max_model_len"):
            llm.generate(big, SamplingParams(max_tokens=1), use_tqdm=False)
        assert _our_files() == []
    assert _our_files() == []


@pytest.mark.skipif(not shm_enabled(), reason="no writable /dev/shm")
def test_a_result_nobody_takes_has_its_payloads_deleted_and_shutdown_cleans_up(
    qwen2_vl_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmengine.input_processor import InputWorkers
    from mmengine.model_loader import read_config

    monkeypatch.setattr(messages, "MIN_PAYLOAD_BYTES", 1)
    texts, _, _ = hf_refs(qwen2_vl_ckpt, "qwen2_vl")
    workers = InputWorkers(
        qwen2_vl_ckpt, read_config(qwen2_vl_ckpt), None, None, torch.float32, num_workers=0
    )
    try:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(qwen2_vl_ckpt)(texts[0])["input_ids"]
        late = workers.submit(ids, {"image": [_img(1)]})
        late.result()
        assert len(_our_files()) == 1  # written, not yet read
        workers.discard_result(late)  # the request was cancelled meanwhile
        assert _our_files() == []
        workers.submit(ids, {"image": [_img(2)]}).result()
        assert len(_our_files()) == 1
    finally:
        workers.shutdown()
    assert _our_files() == []  # the session's leftovers go with the pool
