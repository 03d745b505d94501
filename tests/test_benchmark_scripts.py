"""The benchmark scripts (run on GPU machines) still import and parse arguments on CPU,
and the W1 profile's trace analysis reads a trace correctly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    p.name
    for p in (ROOT / "benchmarks").glob("*.py")
    if p.name.startswith(("ab_", "bench_", "profile_", "sweep_"))
    or p.name in ("random_checkpoint.py", "mid_run_compiles.py")
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_shows_its_help_on_cpu(script: str) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout.lower()


def test_ab_variants_split_environment_engine_options_and_extra_entries() -> None:
    from benchmarks.ab_decode_graphs import parse_variant

    name, env, opts = parse_variant(
        ["g8", "MMENGINE_DISABLE_PDL=1", "max_model_len=4096", "extra.gemv_max_tokens=8"]
    )
    assert name == "g8"
    assert env == {"MMENGINE_DISABLE_PDL": "1"}
    assert opts == {"max_model_len": 4096, "extra": {"gemv_max_tokens": 8}}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_variant(["bad", "max_model_len"])


def test_w1_profile_analysis_counts_busy_time_phases_and_steps() -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.profile_w1 import analyse, union_length

    assert union_length([(0, 10), (5, 20), (30, 40)]) == 30
    trace = {
        "traceEvents": [
            {"ph": "X", "cat": "user_annotation", "name": "mm:encoder", "ts": 0, "dur": 100},
            {"ph": "X", "cat": "user_annotation", "name": "mm:forward", "ts": 100, "dur": 100},
            {"ph": "X", "cat": "user_annotation", "name": "mm:encoder", "ts": 1000, "dur": 50},
            {"ph": "X", "cat": "gpu_user_annotation", "name": "mm:encoder", "ts": 0, "dur": 300},
            {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_gemm", "ts": 10, "dur": 200},
            {"ph": "X", "cat": "kernel", "name": "_paged_attention_kernel", "ts": 1000, "dur": 100},
        ]
    }
    text = analyse(trace, 1.0, None)
    assert "GPU busy (union of kernels): 0.00 s = 27% of the span" in text  # 300 of 1100 us
    assert "| mm:encoder | 2 |" in text and "| mm:forward | 1 |" in text
    assert "| GEMM (cuBLAS) |" in text and "| paged attention (Triton) |" in text
    assert "over 2 steps" in text


def _run_in(folder: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """Runs benchmarks/<argv[0]> with its results ($OUT) and working folder in `folder`."""
    import os

    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=folder,
        env={**os.environ, "OUT": str(folder)},
    )


def test_serving_benchmark_serves_the_default_model_and_reports_every_rate(
    tmp_path: Path,
) -> None:
    import json

    out = _run_in(
        tmp_path,
        [
            "bench_serving.py",
            "--rates",
            "inf,20",
            "--num-requests",
            "4",
            "--text-len",
            "6",
            "--output-len",
            "3",
            "--image-sizes",
            "64x64,96x64",
            "--warmup-requests",
            "1",
        ],
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "serving.json").read_text())
    assert [r["rate"] for r in rows] == [float("inf"), 20.0]
    for r in rows:
        assert r["failed"] == 0 and r["requests"] == 4, r["errors"]
        assert r["output_tok_per_s"] > 0 and r["ttft_ms"]["p50"] > 0
    assert "| inf | 4 | 0 |" in (tmp_path / "serving.md").read_text()


def test_cache_reuse_benchmark_shows_hits_with_caches_on_and_none_with_them_off(
    tmp_path: Path,
) -> None:
    import json

    out = _run_in(
        tmp_path,
        [
            "bench_cache_reuse.py",
            "--device",
            "cpu",
            "--images",
            "2",
            "--questions",
            "2",
            "--conversations",
            "2",
            "--turns",
            "3",
            "--max-tokens",
            "3",
            "--image-size",
            "96x96",
        ],
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {
        (r["workload"], r["caching"]): r
        for r in json.loads((tmp_path / "cache_reuse.json").read_text())
    }
    on, off = rows[("multi turn", "on")], rows[("multi turn", "off")]
    # Later turns resend the image and the history: both caches hit with caching on.
    assert on["embedding_cache_hits"] > 0 and on["prefix_cache_hit_tokens"] > 0
    assert on["encoder_runs"] < off["encoder_runs"]
    assert off["embedding_cache_hits"] == 0 and off["prefix_cache_hit_tokens"] == 0
    assert "| multi turn | on | 6 |" in (tmp_path / "cache_reuse.md").read_text()


def test_random_checkpoint_with_the_borrowed_tokenizer_runs_the_chat_benchmark(
    tmp_path: Path,
) -> None:
    """A Qwen2.5-VL-shaped random checkpoint (tiny dims, the published vocabulary) with the
    embedded model's tokenizer: its special ids are that tokenizer's, and the W4 chat
    benchmark runs on it (images through the chat template, the cache counters move)."""
    import json

    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.model_configs import QWEN25_VL_3B
    from benchmarks.random_checkpoint import build_random_checkpoint

    tiny = {
        **QWEN25_VL_3B,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vision_config": {
            **QWEN25_VL_3B["vision_config"],
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
        },
    }
    ck = build_random_checkpoint(tiny, tmp_path / "ck", device="cpu", dtype=torch.float32)
    embedded = json.loads((ROOT / "mmengine/assets/default_model/config.json").read_text())
    text = (ck / "config.json").read_text()
    for key in ("image_token_id", "vision_start_token_id", "eos_token_id"):
        assert f'"{key}": {embedded[key]}' in text
        assert f'"{key}": {QWEN25_VL_3B[key]}' not in text
    assert (ck / "tokenizer.json").exists() and (ck / "preprocessor_config.json").exists()
    from mmengine import LLM, SamplingParams

    llm = LLM(str(ck), device="cpu", dtype="float32", max_model_len=256)
    try:
        [res] = llm.generate(
            "a photo of", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        )
        vocab = len(llm.tokenizer)
    finally:
        llm.shutdown()
    # Rows past the tokenizer are zeroed (logit 0), so greedy emits ids that have text.
    from safetensors.torch import load_file

    emb = load_file(str(ck / "model.safetensors"))["model.embed_tokens.weight"]
    assert emb.shape[0] == QWEN25_VL_3B["vocab_size"]
    assert not emb[vocab:].any() and emb[:vocab].abs().sum(dim=1).gt(0).all()
    assert max(res.outputs[0].token_ids) < vocab and res.outputs[0].text

    flags = "--device cpu --images 2 --questions 2 --conversations 1 --turns 2 --max-tokens 2"
    out = _run_in(
        tmp_path, ["bench_cache_reuse.py", str(ck), *flags.split(), "--image-size", "56x56"]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "cache_reuse.json").read_text())
    turns_on = next(r for r in rows if r["workload"] == "multi turn" and r["caching"] == "on")
    # Turn 2 resends turn 1's image and history: the chat template placed the image tokens.
    assert turns_on["embedding_cache_hits"] > 0 and turns_on["prefix_cache_hit_tokens"] > 0


def _cpu_llm(ckpt: Path):  # noqa: ANN202
    """An in-process fp32 engine on the CPU with a 64-token step budget (the benchmark
    scripts' step drivers, tested without a GPU)."""
    import torch

    from mmengine import LLM

    torch.set_num_threads(1)
    return LLM(
        str(ckpt),
        dtype="float32",
        device="cpu",
        skip_tokenizer_init=True,
        multiprocess=False,
        max_model_len=160,
        max_num_batched_tokens=64,
    )


def test_mixed_step_profile_runs_prompt_chunks_with_decodes_riding_along(
    qwen2_ckpt: Path,
) -> None:
    """profile_llm_steps' mixed step (GPU kernels on the device; here its driving): the
    profiled steps hold every decode plus a full budget of prompt tokens, and it leaves no
    request behind."""

    sys.path.insert(0, str(ROOT))
    from benchmarks.profile_llm_steps import mixed_steps

    llm = _cpu_llm(qwen2_ckpt)
    core = llm._client.core
    core.async_scheduling = True  # as on a GPU; the profile turns it off for its steps
    try:
        seen, kernels, host_ms = mixed_steps(
            llm, decodes=5, ctx=140, prompts=2, prompt_len=40, steps=2
        )
        assert seen == [(5, 59), (5, 59)]  # 64-token budget: 5 decodes + 59 prompt tokens
        assert kernels == []  # CPU: no GPU kernels to report
        assert host_ms > 0
        assert not core.has_unfinished() and core.async_scheduling
        assert core.stats().kv_blocks_used == 0
    finally:
        llm.shutdown()


@pytest.mark.parametrize("max_len", [256, 512, 4096])
def test_mid_run_compile_phases_fit_the_model_length(max_len: int) -> None:
    # Each phase must be a request the engine accepts (a first version sent a 4096-token
    # prompt at max_model_len 4096 and died on the validation error).
    from benchmarks.mid_run_compiles import phases

    vocab = 1000
    for name, prompts, kw in phases(vocab, max_len):
        assert prompts, name
        for p in prompts:
            assert len(p) + kw["max_tokens"] <= max_len, (name, len(p))
            assert all(0 <= t < vocab for t in p), name


def test_b1_layers_variants_parse_and_one_layer_steps_on_cpu() -> None:
    # The batch-1 layer chain runs each kernel's torch path on CPU: the same launches in
    # the same order as on a GPU, so a broken call fails here before a device run.
    import torch

    from benchmarks import bench_b1_layers as b1

    variants = b1.parse_variants(
        "e,g:splits=16:merge=fused:gu=2x4:o=2x2048x4,t:splits=8:merge=two:gu=sep,"
        "p:trig=plain.early+attn.late:qkv=1x2048x4,n:onorm=1,f:mlp=flow"
    )
    assert [(v.splits, b1.MERGES[v.merge]) for v in variants] == [
        (0, None),
        (16, True),
        (8, False),
        (0, None),
        (0, None),
        (0, None),
    ]
    assert [v.separate_norm for v in variants] == [False, False, True, False, False, False]
    assert [v.norm_out for v in variants] == [False] * 4 + [True, False]
    assert [v.mlp for v in variants] == [""] * 5 + ["flow"]
    assert variants[0].config("gu", 1, b1.INTER, b1.H, gated=True) is None
    # COLUMNSxWARPS keeps launch_config's K tile; COLUMNSxBLOCK_KxWARPS sets it.
    assert tuple(variants[1].config("gu", 1, b1.INTER, b1.H, gated=True))[:3] == (2, 1024, 4)
    assert tuple(variants[1].config("o", 1, b1.H, b1.H))[:3] == (2, 2048, 4)
    assert variants[3].trigger == "plain=early,attn=late"
    defaults = b1.parse_variants(b1.DEFAULT_VARIANTS)  # the GPU run's list parses
    assert defaults[0].name == "engine" and len({v.name for v in defaults}) == len(defaults)
    for bad in (
        "x:1", "x:splits=a", "x:merge=both", "x:gu=2", "x:gu=0x2", "x:o=2x4x4x1",
        "x:trig=plain.soon", "x:trig=", ":splits=2", "x:onorm=2", "x:gu=sep:onorm=1", "x:mlp=fast",
    ):  # fmt: skip
        with pytest.raises(SystemExit, match="--variants"):
            b1.parse_variants(bad)
    layers = b1.build_layers(torch.device("cpu"), 1)
    outs = [b1.step_calls(layers, v, 40, 64, torch.device("cpu"))[0]() for v in variants]
    assert all(o.shape == (1, b1.H) and torch.isfinite(o.float()).all() for o in outs)
    # The norm as its own launch computes the same layer (the KV cache is drawn per call,
    # so compare two calls of one variant's step with the other variant's on equal caches).
    torch.manual_seed(0)
    fused = b1.step_calls(layers, variants[0], 40, 64, torch.device("cpu"))[0]()
    torch.manual_seed(0)
    apart = b1.step_calls(layers, variants[2], 40, 64, torch.device("cpu"))[0]()
    torch.testing.assert_close(apart, fused, rtol=0.02, atol=0.02)
    torch.manual_seed(0)  # o_proj writing gate_up's norm: the same ops, in the same order
    by_o_proj = b1.step_calls(layers, variants[4], 40, 64, torch.device("cpu"))[0]()
    assert torch.equal(by_o_proj, fused)
    torch.manual_seed(0)  # the one-launch MLP half: its torch reference, the same ops
    flow = b1.step_calls(layers, variants[5], 40, 64, torch.device("cpu"))[0]()
    assert torch.equal(flow, fused)


def test_mixed_attention_batches_give_each_sequence_its_own_cache_blocks() -> None:
    # The mixed-step sweep's batch: prompts and decodes over shuffled, disjoint blocks, and
    # the attention call it times runs on it (the torch path on CPU).
    import torch

    from benchmarks import sweep_mixed_attention as mixed

    q_lens, seq_lens = [1, 1, 20, 12], [40, 17, 20, 12]
    batch = mixed.mixed_batch(q_lens, seq_lens, device="cpu")
    table = batch["block_tables"]
    used = [table[i, : -(-s // mixed.BLOCK_SIZE)].tolist() for i, s in enumerate(seq_lens)]
    flat = [b for row in used for b in row]
    assert sorted(flat) == list(range(batch["key_cache"].shape[0]))  # each block once
    assert batch["query_start_loc"].tolist() == [0, 1, 2, 22, 34]
    assert (batch["max_query_len"], batch["max_seq_len"]) == (20, 40)
    out = mixed.call(batch, tile=(64, 64, 4, 3))()
    assert out.shape == (34, mixed.HQ, mixed.HEAD_SIZE) and torch.isfinite(out.float()).all()


def test_step_host_times_each_fresh_prefill_step_and_leaves_nothing_behind(
    qwen2_ckpt: Path,
) -> None:
    """bench_step_host's driving (the GPU times come from the device): one timed row per
    step after a warm-up step, the runner's execute restored, synchronous steps only
    while timing, no request or KV block left; variants and step shapes parse."""
    import cProfile

    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_step_host import parse_variant, step_shapes, time_steps

    assert parse_variant("base") == ("base", {})
    assert parse_variant("whole:compile_whole_model=1,gemv_rope=0") == (
        "whole",
        {"compile_whole_model": 1, "gemv_rope": 0},
    )
    with pytest.raises(SystemExit):
        parse_variant("bad:compile_whole_model")
    assert step_shapes(8192, 1024) == (8, 1024)
    assert step_shapes(256, 1024) == (1, 256)
    assert step_shapes(1536, 1024) == (1, 1536)

    llm = _cpu_llm(qwen2_ckpt)
    core = llm._client.core
    core.async_scheduling = True
    execute = core.runner.execute
    try:
        prof = cProfile.Profile()
        timer = time_steps(llm, n_prompts=2, length=30, repeats=3, seed=1, profiler=prof)
        assert len(timer.rows) == 3  # one step each: 2 x 30 tokens fit the 64-token budget
        for launch, step, _gpu in timer.rows:
            assert 0 < launch <= step
        assert prof.getstats()  # the launches were profiled
        assert core.runner.execute == execute and core.async_scheduling
        assert not core.has_unfinished() and core.stats().kv_blocks_used == 0
    finally:
        llm.shutdown()


def test_step_host_times_vision_steps_of_fresh_images(qwen2_vl_ckpt: Path) -> None:
    """bench_step_host --images: each timed step carries one prompt of a fresh image
    (processed by the input path, then encoded in the step), so no embedding or prefix
    cache hit makes a step cheaper than the one it stands for."""
    import json

    import torch

    from mmengine import LLM

    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_step_host import image_prompt_maker, time_steps

    cfg = json.loads((qwen2_vl_ckpt / "config.json").read_text())
    vision = tuple(
        cfg[k] for k in ("vision_start_token_id", "image_token_id", "vision_end_token_id")
    )
    torch.set_num_threads(1)
    llm = LLM(
        str(qwen2_vl_ckpt), dtype="float32", device="cpu", skip_tokenizer_init=True,
        multiprocess=False, max_model_len=256, max_num_batched_tokens=192,
    )  # fmt: skip
    try:
        make = image_prompt_maker(llm, (56, 56), text_len=8, seed=3, image_token_ids=vision)
        ids, mm = make(0, 0)
        assert len(mm.mm_items) == 1 and len(ids) > 3 + 8  # the image's placeholders expanded
        core = llm._client.core
        before = llm.stats()
        timer = time_steps(llm, 1, 0, repeats=3, seed=3, make_prompt=make)
        after = llm.stats()
        assert len(timer.rows) == 3 and timer.tokens == [len(ids)] * 3  # one step a prompt
        assert after["encoder_items"] - before["encoder_items"] == 4  # warm-up + 3, all encoded
        assert after["embedding_cache_hits"] == before["embedding_cache_hits"]
        assert after["mm_prefix_cache_hit_tokens"] == before["mm_prefix_cache_hit_tokens"]
        assert not core.has_unfinished() and core.stats().kv_blocks_used == 0
    finally:
        llm.shutdown()


def test_every_gpu_test_runs_in_a_group_of_the_parallel_gpu_script() -> None:
    # benchmarks/gpu_tests_parallel.sh is how a device call runs the GPU suite: a GPU test
    # in no group of it would never run.
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    script = (root / "benchmarks" / "gpu_tests_parallel.sh").read_text()
    block = script[script.index("groups=(") : script.index("\n)", script.index("groups=("))]
    targets = [t for group in re.findall(r'"([^"]+)"', block) for t in group.split()]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
         "-p", "no:cacheprovider", "tests"],
        cwd=root, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert ids, proc.stdout[-2000:] + proc.stderr[-2000:]

    def covered(node: str) -> bool:
        path, name = node.split("::", 1)
        base = name.split("[", 1)[0]
        return any(
            t in (path, f"{path}::{base}") or path.startswith(t.rstrip("/") + "/") for t in targets
        )

    missing = sorted({n.split("[", 1)[0] for n in ids if not covered(n)})
    assert not missing, f"GPU tests in no group of gpu_tests_parallel.sh: {missing}"


def test_media_cpu_benchmark_times_each_stage_of_one_image(tmp_path, monkeypatch) -> None:
    import json

    from benchmarks import bench_media_cpu

    monkeypatch.setenv("OUT", str(tmp_path))
    bench_media_cpu.main(["--sizes", "64x48,56x56", "--reps", "1", "--video-frames", "8"])
    rows = json.loads((tmp_path / "media_cpu.json").read_text())
    assert [r["size"] for r in rows] == ["64x48", "56x56", "8 x 640x360 @ 8 fps"]
    assert all(r["total_ms"] > 0 and r["patches"][1] == 1176 for r in rows)
    assert "| 64x48 |" in (tmp_path / "media_cpu.md").read_text()
