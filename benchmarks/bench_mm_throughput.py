"""Multimodal offline throughput (W1 quick) and encoder stress (W3), on one GPU.

W1: N requests (seed 0), each one random-noise RGB image (half 256x256, half 1280x720:
81 / 1196 visual tokens) then 256 random text tokens, exactly 128 output tokens
(ignore_eos). Qwen2.5-VL-3B's published config with random bf16 weights, saved once as a
checkpoint so mmengine and HF transformers run the same weights. W3: 8 images of 224x224
per request, 32 text tokens, 1 output token: images/s through preprocessing + encoder.
Also: CPU preprocessing ms per 1280x720 image, mmengine vs HF's fast processor.
Writes $OUT/mm_throughput.md and .json.

    python benchmarks/bench_mm_throughput.py --num-requests 200
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_text_throughput import ceilings  # noqa: E402
from benchmarks.model_configs import CONFIGS, QWEN_VL_PREPROCESSOR  # noqa: E402
from benchmarks.random_checkpoint import build_random_checkpoint  # noqa: E402

VISION_START, IMAGE_PAD, VISION_END = 151652, 151655, 151653


def noise_image(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def w1_requests(n: int, text_len: int, seed: int = 0) -> list[tuple[Image.Image, list[int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = (256, 256) if i % 2 == 0 else (1280, 720)
        text = rng.integers(1000, 150000, text_len).tolist()
        out.append((noise_image(seed * 100000 + i, w, h), text))
    return out


def build_checkpoint(tmp: Path) -> Path:
    """Random Qwen2.5-VL-3B weights (W1 feeds token ids: no tokenizer needed)."""
    return build_random_checkpoint(
        CONFIGS["qwen2.5-vl-3b"], tmp / "qwen2.5-vl-3b-random", device="cuda", tokenizer=False
    )


def start_py_spy(llm, path: Path):  # noqa: ANN001, ANN201 - LLM, subprocess.Popen
    """Samples the engine-core process with py-spy (no pauses: --nonblocking) into `path`."""
    import shutil
    import subprocess

    pid = llm._client._proc.pid  # the engine-core child process (multiprocess engine)
    exe = shutil.which("py-spy") or "/tmp/site/bin/py-spy"
    cmd = [exe, "record", "--pid", str(pid), "--rate", "500", "--format", "raw", "--idle"]
    spy = subprocess.Popen(
        cmd + ["--nonblocking", "-o", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # attached and sampling before the run starts
    return spy


def stop_py_spy(spy, path: Path) -> None:  # noqa: ANN001
    import signal

    from benchmarks.pyspy_summary import parse, summarize

    spy.send_signal(signal.SIGINT)
    try:
        _, err = spy.communicate(timeout=60)
    except Exception:
        spy.kill()
        err = ""
    if not Path(path).exists():
        print(f"py-spy wrote nothing: {err[-500:]}", flush=True)
        return
    lines = summarize(parse(path), 30, "serve (")
    text = "py-spy of the engine-core loop during the W1 run:\n" + "\n".join(lines)
    print(text, flush=True)
    Path(path).with_suffix(".md").write_text(text + "\n")


def run_mmengine(ck: Path, reqs, out_len: int, args) -> dict:
    from mmengine import LLM, SamplingParams

    if args.step_trace:
        os.environ["MMENGINE_STEP_TRACE"] = str(args.step_trace)  # mmengine/step_trace.py
    t0 = time.perf_counter()
    llm = LLM(
        str(ck),
        dtype="bfloat16",
        device="cuda",
        skip_tokenizer_init=True,
        async_scheduling=args.async_scheduling,
        max_model_len=4096,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_encoder_tokens=args.max_num_encoder_tokens,
        num_input_workers=args.input_workers,
        enforce_eager=args.enforce_eager,
        extra={
            "compile_encoder": args.compile_encoder,
            "vision_segment_kernel": args.vision_segment_kernel,
        },
        multiprocess=not args.inprocess,
        cpu_threads=args.core_threads,
    )
    startup = time.perf_counter() - t0

    def prompts(rs):
        return [
            {
                "prompt_token_ids": [VISION_START, IMAGE_PAD, VISION_END] + text,
                "multi_modal_data": {"image": img},
            }
            for img, text in rs
        ]

    p = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    warm = w1_requests(args.warmup_requests, 16, seed=7)
    llm.generate(prompts(warm), p, use_tqdm=False)
    before = llm.stats()
    if args.torch_profile:
        llm.start_profile(args.torch_profile)
    spy = start_py_spy(llm, args.py_spy) if args.py_spy else None
    print(f"timed W1 run starts ({time.strftime('%H:%M:%S')})", flush=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts(reqs), p, use_tqdm=False)
    wall = time.perf_counter() - t0
    print(f"timed W1 run ends ({time.strftime('%H:%M:%S')})", flush=True)
    if spy is not None:
        stop_py_spy(spy, args.py_spy)
    if args.torch_profile:
        llm.stop_profile()
        from benchmarks.profile_w1 import analyse, load_trace

        text = analyse(load_trace(args.torch_profile), wall, None)
        print("torch.profiler of the engine core during the W1 run:\n" + text, flush=True)
        Path(str(args.torch_profile).split(".json")[0] + ".md").write_text(text)
    after = llm.stats()
    traced = (int(before["num_steps"]), int(after["num_steps"]))
    media_s = llm.last_media_time_s
    profile = {k: round(after[k] - before[k], 3) for k in after if k.startswith(("time_", "cuda_"))}
    profile["last_prompt_submitted_at_s"] = round(media_s, 3)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_prompt = sum(len(o.prompt_token_ids) for o in outs)
    peak = torch.cuda.mem_get_info()
    # W3: 8 images of 224x224 per request, 32 text tokens, 1 output token.
    rng = np.random.default_rng(3)
    w3 = []
    for i in range(args.w3_requests):
        ids: list[int] = []
        for _ in range(8):
            ids += [VISION_START, IMAGE_PAD, VISION_END]
        ids += rng.integers(1000, 150000, 32).tolist()
        imgs = [noise_image(50000 + i * 8 + j, 224, 224) for j in range(8)]
        w3.append({"prompt_token_ids": ids, "multi_modal_data": {"image": imgs}})
    s0 = llm.stats()
    t0 = time.perf_counter()
    llm.generate(w3, SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    w3_wall = time.perf_counter() - t0
    s1 = llm.stats()
    llm.shutdown()
    if args.step_trace:
        os.environ.pop("MMENGINE_STEP_TRACE", None)
        from benchmarks.step_trace_report import load, report

        lines = report(load(args.step_trace)[traced[0] : traced[1]])
        print("step trace of the W1 run:\n" + "\n".join(lines), flush=True)
        (Path(args.step_trace).with_suffix(".md")).write_text("\n".join(lines) + "\n")
    return {
        "system": f"mmengine ({_mode(args)})",
        "wall_s": wall,
        "output_tokens": n_out,
        "prompt_tokens": n_prompt,
        "startup_s": startup,
        "profile": profile,
        "gpu_free_after_gib": peak[0] / 2**30,
        "w3_wall_s": w3_wall,
        "w3_images": 8 * len(w3),
        "w3_encoder_s": s1["time_encoder_s"] - s0["time_encoder_s"],
    }


def run_hf(ck: Path, reqs, out_len: int, batch: int, cap_s: float) -> dict:
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen2_vl import image_processing_qwen2_vl_fast as fast

    proc = fast.Qwen2VLImageProcessorFast(
        **{k: v for k, v in QWEN_VL_PREPROCESSOR.items() if k != "image_processor_type"}
    )
    model = (
        AutoModelForImageTextToText.from_pretrained(
            ck, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
        .cuda()
        .eval()
    )
    groups: dict[tuple[int, int], list] = {}
    for img, text in reqs:
        groups.setdefault(img.size, []).append((img, text))
    done, n_out = 0, 0
    merge = 4
    t0 = time.perf_counter()
    with torch.no_grad():
        for items in groups.values():
            for i in range(0, len(items), batch):
                chunk = items[i : i + batch]
                enc = proc(images=[im for im, _ in chunk], return_tensors="pt")
                grid = enc["image_grid_thw"]
                n_img = int(grid[0].prod()) // merge
                ids = torch.tensor(
                    [[VISION_START] + [IMAGE_PAD] * n_img + [VISION_END] + t for _, t in chunk],
                    device="cuda",
                )
                g = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    pixel_values=enc["pixel_values"].cuda().to(torch.bfloat16),
                    image_grid_thw=grid.cuda(),
                    max_new_tokens=out_len,
                    min_new_tokens=out_len,
                    do_sample=False,
                    pad_token_id=0,
                )
                n_out += (g.shape[1] - ids.shape[1]) * ids.shape[0]
                done += len(chunk)
                if time.perf_counter() - t0 > cap_s:
                    break
            if time.perf_counter() - t0 > cap_s:
                break
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "system": f"HF transformers generate (batch {batch})",
        "wall_s": wall,
        "output_tokens": n_out,
        "requests_done": done,
    }


def cpu_preprocess_ms() -> dict:
    from transformers.models.qwen2_vl import image_processing_qwen2_vl_fast as fast

    from processors.qwen2_vl import Qwen2VLPreprocessor

    img = noise_image(1, 1280, 720)
    ours = Qwen2VLPreprocessor.from_config(QWEN_VL_PREPROCESSOR)
    hf = fast.Qwen2VLImageProcessorFast(
        **{k: v for k, v in QWEN_VL_PREPROCESSOR.items() if k != "image_processor_type"}
    )
    res = {}
    for name, fn in (
        ("mmengine", lambda: ours.preprocess_image(img)),
        ("hf_fast", lambda: hf(images=[img], return_tensors="pt")),
    ):
        fn()
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        res[name] = (time.perf_counter() - t0) / 10 * 1e3
    res["threads"] = torch.get_num_threads()
    return res


def _mode(args) -> str:
    mode = "eager" if args.enforce_eager else "compile+graphs"
    if args.async_scheduling is False:
        mode += ", sync steps"
    if args.vision_segment_kernel:
        mode += ", vision segment kernel"
    if args.core_threads is not None:
        mode += f", {args.core_threads} core threads"
    return mode


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--text-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-num-encoder-tokens", type=int, default=16384)
    ap.add_argument("--input-workers", type=int, default=8)
    ap.add_argument("--w3-requests", type=int, default=64)
    ap.add_argument(
        "--warmup-requests",
        type=int,
        default=4,
        help="W1-style requests (16 text tokens) run before the timed W1 run (since the "
        "input workers all start with the engine, 1, 4 and 8 give the same figure within "
        "noise: benchmarks/RESULTS.md, session 5)",
    )
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--hf-cap-s", type=float, default=150.0)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="plan each step while the GPU runs the previous one (default: the engine's, on)",
    )
    ap.add_argument(
        "--no-compile-encoder",
        dest="compile_encoder",
        action="store_false",
        help="run the ViT blocks eagerly (default: torch.compile them, as the engine does)",
    )
    ap.add_argument(
        "--vision-segment-kernel",
        action="store_true",
        help="window attention of the vision tower through mmkernels/segment_attention.py "
        "(the engine's extra={'vision_segment_kernel': True}; off by default: no consistent "
        "gain when measured, benchmarks/RESULTS.md session 6)",
    )
    ap.add_argument(
        "--step-trace",
        type=Path,
        default=None,
        help="record the engine's per-step timeline (MMENGINE_STEP_TRACE) to this .jsonl "
        "file and print its summary for the W1 run (benchmarks/step_trace_report.py)",
    )
    ap.add_argument(
        "--torch-profile",
        type=Path,
        default=None,
        help="profile the engine core (LLM.start_profile) during the W1 run into this "
        ".json.gz trace and print its summary (benchmarks/profile_w1.py --analyse)",
    )
    ap.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        help="sample the engine-core process with py-spy during the W1 run into this raw "
        "file and print where its loop spends its time (benchmarks/pyspy_summary.py)",
    )
    ap.add_argument(
        "--core-threads",
        type=int,
        default=None,
        help="torch CPU threads of the engine-core process (the engine's cpu_threads)",
    )
    ap.add_argument("--systems", default="mmengine,hf")
    ap.add_argument(
        "--inprocess", action="store_true", help="engine core in the frontend's process"
    )
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "."))
    card = torch.cuda.get_device_name()
    ceil = ceilings()
    pre = cpu_preprocess_ms()
    print(f"card {card}: {ceil}; CPU preprocessing of a 1280x720 image (ms): {pre}", flush=True)
    reqs = w1_requests(args.num_requests, args.text_len)
    rows = []
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        t0 = time.perf_counter()
        ck = build_checkpoint(Path(tmp))
        print(f"random checkpoint written in {time.perf_counter() - t0:.0f}s", flush=True)
        for system in args.systems.split(","):
            try:
                if system == "mmengine":
                    try:
                        rows.append(run_mmengine(ck, reqs, args.output_len, args))
                    except Exception as e:  # report, then measure the eager engine instead
                        rows.append(
                            {
                                "system": "mmengine (compile+graphs)",
                                "error": f"{type(e).__name__}: {e}"[:400],
                            }
                        )
                        print(json.dumps(rows[-1]), flush=True)
                        args.enforce_eager = True
                        rows.append(run_mmengine(ck, reqs, args.output_len, args))
                elif system == "hf":
                    rows.append(run_hf(ck, reqs, args.output_len, args.hf_batch, args.hf_cap_s))
            except Exception as e:  # a peer that cannot run is reported, not skipped
                rows.append({"system": system, "error": f"{type(e).__name__}: {e}"[:400]})
            print(json.dumps(rows[-1]), flush=True)
    n = args.num_requests
    lines = [
        f"### W1 quick (multimodal) — Qwen2.5-VL-3B config, random bf16 weights, {card}",
        "",
        f"{n} requests: one noise image (half 256x256, half 1280x720) + {args.text_len} text tokens, "
        f"{args.output_len} output tokens (ignore_eos, greedy). Ceilings: copy {ceil['copy_GBps']:.0f} GB/s, "
        f"bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s.",
        "",
        "| system | wall s | req/s | output tok/s | total tok/s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['system']} | failed: {r['error']} | | | |")
            continue
        done = r.get("requests_done", n)
        w = r["wall_s"]
        note = f" ({done} of {n} requests, capped)" if done < n else ""
        total = r.get("prompt_tokens", 0) + r["output_tokens"]
        lines.append(
            f"| {r['system']}{note} | {w:.2f} | {done / w:.2f} | {r['output_tokens'] / w:.0f} | "
            f"{total / w:.0f} |"
            if total
            else f"| {r['system']}{note} | {w:.2f} | {done / w:.2f} | {r['output_tokens'] / w:.0f} | - |"
        )
    mm = [r for r in rows if r.get("system", "").startswith("mmengine") and "error" not in r]
    if mm:
        r = mm[0]
        lines += [
            "",
            f"mmengine profile of the W1 run (engine-core seconds, plus the frontend's wait for "
            f"media preprocessing): {r['profile']}; start-up {r['startup_s']:.0f} s.",
            "",
            f"W3 (encoder stress): {r['w3_images']} images of 224x224 (8 per request, 32 text tokens, "
            f"1 output token) in {r['w3_wall_s']:.2f} s = {r['w3_images'] / r['w3_wall_s']:.0f} images/s end to end "
            f"(encoder {r['w3_encoder_s']:.2f} s).",
        ]
    lines += [
        "",
        f"CPU preprocessing of one 1280x720 image ({pre['threads']} torch threads): mmengine "
        f"{pre['mmengine']:.1f} ms, HF Qwen2VLImageProcessorFast {pre['hf_fast']:.1f} ms.",
    ]
    text = "\n".join(lines)
    print(text)
    (out_dir / "mm_throughput.md").write_text(text + "\n")
    (out_dir / "mm_throughput.json").write_text(
        json.dumps({"card": card, "ceilings": ceil, "pre": pre, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
