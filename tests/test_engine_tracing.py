"""Looking inside a running engine: the per-step trace (MMENGINE_STEP_TRACE: one record per
executed step, from the engine-core process too, written at shutdown, and its report) and
torch.profiler of the engine core (LLM.start_profile / stop_profile)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.step_trace_report import kind_of, report
from mmengine import LLM, SamplingParams
from mmengine.step_trace import ENV

torch.set_num_threads(1)


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8))


@pytest.mark.parametrize("multiprocess", [False, True], ids=["inprocess", "core-process"])
def test_trace_has_one_record_per_step_with_what_it_ran(
    qwen2_vl_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, multiprocess: bool
) -> None:
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv(ENV, str(path))
    prompts = [
        {
            "prompt": f"<|vision_start|><|image_pad|><|vision_end|>describe {i}",
            "multi_modal_data": {"image": _image(i)},
        }
        for i in range(3)
    ] + ["a text prompt"]
    llm = LLM(
        str(qwen2_vl_ckpt),
        dtype="float32",
        device="cpu",
        max_model_len=512,
        max_num_batched_tokens=64,  # several prefill chunks, then decodes
        multiprocess=multiprocess,
        num_input_workers=0,
    )
    try:
        llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
        steps = int(llm.stats()["num_steps"])
        assert not path.exists()  # written at shutdown, not while serving
    finally:
        llm.shutdown()
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(recs) == steps > 0
    assert [r["t"] for r in recs] == sorted(r["t"] for r in recs)
    kinds = [kind_of(r) for r in recs]
    assert kinds[0] == "encoder+llm" and kinds[-1] == "decode only"
    assert sum(r["encoder_items"] for r in recs) == 3  # each image encoded once
    assert sum(r["encoder_tokens"] for r in recs) > 0
    # Every prompt token is prefilled once; each request decodes 5 tokens after its first.
    assert sum(r["decode_rows"] for r in recs) == 4 * 5
    assert all(r["launch_s"] > 0 and r["schedule_s"] >= 0 for r in recs)
    assert all(r["gpu_start_s"] is None for r in recs)  # no CUDA events on the CPU
    table = "\n".join(report(recs))
    for kind in ("encoder+llm", "decode only"):
        assert f"| {kind} | {kinds.count(kind)} |" in table


def test_report_finds_the_gpu_idle_gaps_between_steps() -> None:
    def step(start: float, end: float, rows: int, enc: int = 0) -> dict:
        return {
            "t": start, "schedule_s": 0.001, "launch_s": 0.002, "wait_s": 0.0,
            "update_s": 0.003, "decode_rows": rows, "prefill_tokens": 0 if not enc else 100,
            "encoder_items": enc, "encoder_tokens": 64 * enc,
            "gpu_start_s": start, "gpu_end_s": end,
        }  # fmt: skip

    recs = [step(0.0, 0.5, 0, enc=2), step(0.6, 0.7, 8), step(0.7, 1.0, 8)]
    lines = report(recs, top=1, tenths=2)
    assert lines[0].startswith("3 steps; GPU span 1.000 s, inside steps 0.900 s (90%)")
    assert "idle between steps 0.100 s" in lines[0]
    assert lines[1] == "GPU inside a step per tenth: 100% 80%"
    gap_rows = [ln for ln in lines if ln.startswith("| 0.600 | 100.0 | decode only")]
    assert len(gap_rows) == 1


@pytest.mark.parametrize("multiprocess", [False, True], ids=["inprocess", "core-process"])
def test_profile_of_the_engine_core_covers_the_steps_between_start_and_stop(
    qwen2_ckpt: Path, tmp_path: Path, multiprocess: bool
) -> None:
    path = tmp_path / "prof.json.gz"
    p = SamplingParams(max_tokens=4, ignore_eos=True)
    with LLM(
        str(qwen2_ckpt), dtype="float32", device="cpu", max_model_len=128,
        multiprocess=multiprocess,
    ) as llm:  # fmt: skip
        with pytest.raises(RuntimeError, match="no profile"):
            llm.stop_profile()
        llm.start_profile(path)
        with pytest.raises(RuntimeError, match="already"):
            llm.start_profile(tmp_path / "other.json")
        llm.generate(["one prompt", "another prompt"], p, use_tqdm=False)
        llm.stop_profile()
        with gzip.open(path, "rt") as f:
            events = json.load(f)["traceEvents"]
        names = [e.get("name") for e in events if e.get("cat") == "user_annotation"]
        # One forward per step: a prefill and 3 decodes (both prompts fit one step).
        assert names.count("mm:forward") == 4
        # Profiling again works, and the engine served normally meanwhile.
        llm.start_profile(tmp_path / "again.json")
        out = llm.generate(["a third"], p, use_tqdm=False)
        llm.stop_profile()
        assert len(out[0].outputs[0].token_ids) == 4
        assert (tmp_path / "again.json").stat().st_size > 0


def test_trace_stops_recording_at_its_step_cap(
    qwen2_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmengine.step_trace import StepTrace

    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv(ENV, str(path))
    monkeypatch.setattr(StepTrace, "MAX_STEPS", 3)
    with LLM(
        str(qwen2_ckpt), dtype="float32", device="cpu", max_model_len=128, multiprocess=False
    ) as llm:
        out = llm.generate(["a prompt"], SamplingParams(max_tokens=6, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 6  # serving goes on past the cap
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(recs) == 3 and all(r["t"] >= 0 for r in recs)


def test_pyspy_summary_attributes_samples_to_the_innermost_project_frame(tmp_path: Path) -> None:
    from benchmarks.pyspy_summary import parse, summarize

    raw = tmp_path / "raw.txt"
    loop = "serve (/x/mmengine/core_process.py:68)"
    step = "step (/x/mmengine/engine_core.py:250)"
    raw.write_text(
        f"main (/x/mmengine/core_process.py:160);{loop} 5\n"
        f"main (/x/mmengine/core_process.py:160);{loop};{step};"
        "to (/usr/lib/site-packages/torch/x.py:1) 3\n"
        "reader (/x/mmengine/core_process.py:110);recv (/usr/lib/zmq/s.py:3) 2\n"
    )
    stacks = parse(raw)
    assert sum(n for _, n in stacks) == 10
    lines = summarize(stacks, top=5, only="serve (")
    assert lines[0] == "8 samples"  # the input thread's stack is left out
    assert "| 37.5 | `step (mmengine/engine_core.py)` |" in lines
    assert "| 62.5 | `serve (mmengine/core_process.py) line 68` |" in lines
    assert "| 37.5 | `step (mmengine/engine_core.py) line 250` |" in lines
