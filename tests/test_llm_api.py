"""The Python API end to end: prompts, chat, sampling controls, errors, lifecycle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mmengine import LLM, SamplingParams
from mmengine.core_client import EngineDeadError

torch.set_num_threads(1)

PROMPTS = [
    "the red circle",
    "a blue square on the right",
    "green triangle moves left while the star waits",
    "café",
]


@pytest.fixture(scope="module")
def llm(qwen2_ckpt: Path):
    with LLM(
        str(qwen2_ckpt), dtype="float32", device="cpu", max_model_len=256, multiprocess=False
    ) as engine:
        yield engine


def test_prompt_forms_string_dict_and_token_ids_agree(llm: LLM) -> None:
    p = SamplingParams(temperature=0, max_tokens=8)
    ids = llm.get_tokenizer()(PROMPTS[1])["input_ids"]
    a, b, c = llm.generate(
        [PROMPTS[1], {"prompt": PROMPTS[1]}, {"prompt_token_ids": ids}], p, use_tqdm=False
    )
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids
    assert a.prompt_token_ids == ids and a.prompt == PROMPTS[1]
    assert a.outputs[0].text == llm.get_tokenizer().decode(
        a.outputs[0].token_ids, skip_special_tokens=True
    )


def test_chat_uses_the_models_template(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    msgs = [{"role": "user", "content": "what color is the circle?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    p = SamplingParams(temperature=0, max_tokens=8)
    chat = llm.chat(msgs, p, use_tqdm=False)[0]
    ref = llm.generate(
        {"prompt_token_ids": tok(text, add_special_tokens=False)["input_ids"]}, p, use_tqdm=False
    )[0]
    assert "<|im_start|>user" in chat.prompt
    assert chat.outputs[0].token_ids == ref.outputs[0].token_ids
    two = llm.chat([msgs, msgs], p, use_tqdm=False)
    assert len(two) == 2


def test_seeded_sampling_is_reproducible_in_any_batch(llm: LLM) -> None:
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate(PROMPTS[2], p, use_tqdm=False)[0].outputs[0].token_ids
    mixed = (
        llm.generate(
            [PROMPTS[0], PROMPTS[2], PROMPTS[3]],
            [
                SamplingParams(temperature=0.7, max_tokens=5),
                p,
                SamplingParams(temperature=1.0, max_tokens=20),
            ],
            use_tqdm=False,
        )[1]
        .outputs[0]
        .token_ids
    )
    assert alone == mixed
    other = llm.generate(
        PROMPTS[2],
        SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=12, ignore_eos=True),
        use_tqdm=False,
    )
    assert other[0].outputs[0].token_ids != alone


def test_n_completions_share_the_prompt(llm: LLM) -> None:
    before = llm.stats()
    prompt = " ".join(["long shared prompt"] * 20)
    out = llm.generate(
        prompt,
        SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 10 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # seeds offset per completion
    after = llm.stats()
    # The followers computed only the tail of the prompt: far fewer than 4 full prompts.
    computed = after["prompt_tokens_computed"] - before["prompt_tokens_computed"]
    assert computed < 2 * len(out.prompt_token_ids)


def test_stop_string_cuts_text_exactly(llm: LLM) -> None:
    free = llm.generate(
        PROMPTS[2], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    text = free.text
    assert len(text) > 6
    stop = text[3:6]
    cut = llm.generate(
        PROMPTS[2],
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
        use_tqdm=False,
    )[0].outputs[0]
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate(
        PROMPTS[2],
        SamplingParams(
            temperature=0,
            max_tokens=24,
            ignore_eos=True,
            stop=[stop],
            include_stop_str_in_output=True,
        ),
        use_tqdm=False,
    )[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_stop_token_id_ends_output_on_that_token(llm: LLM) -> None:
    free = llm.generate(
        PROMPTS[1], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    target = free.token_ids[5]
    first = free.token_ids.index(target)
    out = llm.generate(
        PROMPTS[1],
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[target]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target


def test_min_tokens_and_ignore_eos_hold(llm: LLM) -> None:
    eos = llm._client.core.spec.eos_token_ids  # in-process engine
    free = llm.generate(
        PROMPTS[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    t = free.token_ids[2]
    out = llm.generate(
        PROMPTS[0],
        SamplingParams(
            temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[t], min_tokens=10
        ),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(out.token_ids) >= 10 and t not in out.token_ids[:9]
    long = llm.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False
    )
    assert all(
        len(o.outputs[0].token_ids) == 40 and o.outputs[0].finish_reason == "length" for o in long
    )
    assert eos  # the fixture declares EOS ids


def test_bad_inputs_raise_clear_errors_and_engine_keeps_working(llm: LLM) -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [5] * 300}, use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [5, 10**6]}, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="sampling params"):
        llm.generate(PROMPTS, [SamplingParams()], use_tqdm=False)
    ok = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) >= 1
    assert llm.stats()["kv_blocks_used"] == 0


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def test_forgotten_llm_leaves_no_process_behind(qwen2_ckpt: Path, tmp_path: Path) -> None:
    script = tmp_path / "forget.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        from mmengine import LLM, SamplingParams
        llm = LLM({str(qwen2_ckpt)!r}, dtype="float32", device="cpu", max_model_len=64)
        print("CORE_PID", llm._client.pid, flush=True)
        llm.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False)
        # no shutdown(): exiting must still stop the engine core
    """)
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    core_pid = int(proc.stdout.split("CORE_PID")[1].split()[0])
    deadline = time.time() + 10
    while time.time() < deadline and _pid_alive(core_pid):
        time.sleep(0.2)
    assert not _pid_alive(core_pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): look at its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_dead_engine_core_raises_instead_of_hanging(qwen2_ckpt: Path) -> None:
    engine = LLM(
        str(qwen2_ckpt), dtype="float32", device="cpu", max_model_len=64, multiprocess=True
    )
    try:
        pid = engine._client.pid
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        t0 = time.time()
        with pytest.raises(EngineDeadError):
            engine.generate("hello", SamplingParams(max_tokens=4), use_tqdm=False)
        assert time.time() - t0 < 10
    finally:
        engine.shutdown()
    assert _children(os.getpid()) == [] or pid not in _children(os.getpid())


def test_shutdown_stops_the_core_process(qwen2_ckpt: Path) -> None:
    engine = LLM(str(qwen2_ckpt), dtype="float32", device="cpu", max_model_len=64)
    pid = engine._client.pid
    assert _pid_alive(pid)
    engine.shutdown()
    assert not _pid_alive(pid)
    engine.shutdown()  # idempotent


def test_sampling_rows_are_reused_rebuilt_at_min_tokens_and_released(llm: LLM) -> None:
    from mmengine.request import Request

    runner = llm._client.core.runner  # in-process engine
    params = SamplingParams(temperature=0.7, seed=3, min_tokens=2, presence_penalty=0.5)
    req = Request("row-test", [5, 6, 7], params, eos_token_ids=[1])
    req.num_output_placeholders = 1  # as in a step: the token being sampled is counted
    first = runner._row(req)
    assert first.blocked_token_ids == [1]  # EOS masked until min_tokens
    assert runner._row(req) is first  # reused while nothing changes
    req.append_output_token(9)
    assert runner._row(req) is first
    assert first.output_token_ids == [9]  # penalties see the live token list
    req.append_output_token(10)
    second = runner._row(req)  # min_tokens reached: rebuilt, nothing blocked
    assert second is not first and second.blocked_token_ids == []
    assert second.generator is first.generator  # the seeded stream goes on
    other = Request("row-test", [5, 6, 7], params, eos_token_ids=[1])  # a reused id
    other.num_output_placeholders = 1
    assert runner._row(other) is not second
    runner.release(["row-test"])
    assert "row-test" not in runner._rows and "row-test" not in runner.generators
    # Engine-side: after a batch (the last ones finish right before the engine idles),
    # no per-request sampling state is left.
    llm.generate(PROMPTS, SamplingParams(temperature=0.8, seed=1, max_tokens=5), use_tqdm=False)
    llm.generate(PROMPTS[0], SamplingParams(max_tokens=2), use_tqdm=False)
    assert runner._rows == {} and runner.generators == {}


def test_the_start_up_heap_is_frozen_until_shutdown_and_a_dropped_engine_is_collected(
    qwen2_ckpt: Path,
) -> None:
    import gc
    import weakref

    gc.unfreeze()
    engine = LLM(
        str(qwen2_ckpt), dtype="float32", device="cpu", max_model_len=64, multiprocess=False
    )
    # Full GC passes no longer traverse the start-up heap (mmengine/gc_heap.py) ...
    assert gc.get_freeze_count() > 10_000
    model = weakref.ref(engine._client.core.runner.model)
    engine.shutdown()
    # ... and shutdown hands it back, so a dropped engine is collected like any object.
    assert gc.get_freeze_count() == 0
    del engine
    gc.collect()
    assert model() is None


def test_the_periodic_log_reports_the_vision_encoder_and_its_cache(
    qwen2_vl_ckpt: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import numpy as np
    from PIL import Image

    from tests.test_mm_parity import _messages

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), np.uint8))
    conv = _messages(["image", "what is this?"])
    conv[0]["content"][0]["image"] = image
    with (
        caplog.at_level(logging.INFO, logger="mmengine.engine_core"),
        LLM(
            str(qwen2_vl_ckpt),
            dtype="float32",
            device="cpu",
            multiprocess=False,
            log_stats_interval_s=0.0,
        ) as llm,
    ):
        params = SamplingParams(temperature=0, max_tokens=2)
        llm.chat([conv, conv], params, use_tqdm=False)  # the same image twice
        # Text before the image: no KV prefix to share, the embeddings are reused.
        other = _messages(["first some words", "image", "and a question"])
        other[0]["content"][1]["image"] = image
        llm.chat(other, params, use_tqdm=False)
    lines = [r.getMessage() for r in caplog.records if "vision encoder" in r.getMessage()]
    assert lines, "no vision-encoder line in the engine's periodic log"
    # One image encoded once (the first batch looks it up once: a miss), then a hit.
    assert "vision encoder: 1 items encoded" in lines[-1]
    assert "embedding-cache hit 50.0%" in lines[-1]
