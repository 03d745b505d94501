"""Where one W1-quick run spends its time: a torch.profiler trace of the whole run (issue 4).

Runs the engine core in-process (so one profiler sees the host and the GPU), warms up,
then profiles W1 quick (the requests of bench_mm_throughput.py) and reports:
  - wall time, GPU busy time (union of kernel intervals) and GPU idle time;
  - per engine phase (the model runner's `mm:encoder`, `mm:prepare`, `mm:forward`,
    `mm:sample` ranges): host time, GPU kernel time launched from it;
  - GPU kernel time by kind (GEMM, attention, Triton/Inductor fused, copies, other);
  - GPU busy fraction over the run in 10 equal slices (idle at the start = waiting for
    the first preprocessed media);
  - the top kernels.
Writes $OUT/profile_w1.md (and the trace as profile_w1.json.gz with --trace).

    python3 benchmarks/profile_w1.py [--num-requests 200] [--trace]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_mm_throughput import (  # noqa: E402
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    build_checkpoint,
    w1_requests,
)

PHASES = ("mm:encoder", "mm:prepare", "mm:forward", "mm:sample")


def kernel_kind(name: str) -> str:
    n = name.lower()
    if "memcpy" in n or "memset" in n:
        return "copy/memset"
    if "paged_attention" in n or "merge_splits" in n:
        return "paged attention (Triton)"
    if "write_kv" in n or "rotary" in n:
        return "rotary / KV write (Triton)"
    if "flash" in n or "fmha" in n or "attention" in n or "cudnn" in n:
        return "attention (cuDNN/flash SDPA)"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "sm90", "cublas")):
        return "GEMM (cuBLAS)"
    if n.startswith("triton_") or "triton" in n:
        return "Triton / Inductor fused"
    if "elementwise" in n or "reduce" in n or "index" in n or "cat" in n or "copy" in n:
        return "torch elementwise/index"
    return "other"


def gc_pause_recorder() -> dict[int, list]:
    """Times every cyclic-GC pass from now on: {generation: [passes, seconds]}. The engine
    core runs in this process here, so a long pass is a stall of the engine loop."""
    import gc

    pauses: dict[int, list] = {}
    started: list[float] = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        entry = pauses.setdefault(info["generation"], [0, 0.0])
        entry[0] += 1
        entry[1] += time.perf_counter() - started[0]

    gc.callbacks.append(callback)
    return pauses


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def analyse(trace: dict, wall_s: float, t_begin_us: float | None) -> str:
    events = trace["traceEvents"]
    kernels = [
        e
        for e in events
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    cpu_ranges = [e for e in events if e.get("cat") == "user_annotation" and e["name"] in PHASES]
    gpu_ranges = [
        e for e in events if e.get("cat") == "gpu_user_annotation" and e["name"] in PHASES
    ]
    if not kernels:
        return "no GPU kernels in the trace\n"
    k_iv = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels]
    start = min(a for a, _ in k_iv)
    if cpu_ranges:
        start = min(start, min(float(e["ts"]) for e in cpu_ranges))
    end = max(b for _, b in k_iv)
    span = end - start
    busy = union_length(k_iv)
    lines = [
        f"- wall (generate call): {wall_s:.2f} s; traced span first range -> last kernel "
        if wall_s
        else f"- traced span first range -> last kernel {span / 1e6:.2f} s",
        f"- GPU busy (union of kernels): {busy / 1e6:.2f} s = {100 * busy / span:.0f}% of the "
        f"span; idle {(span - busy) / 1e6:.2f} s",
        "",
        "| phase | calls | host s | GPU kernel s (sum) |",
        "|---|---|---|---|",
    ]
    host = defaultdict(float)
    calls = defaultdict(int)
    for e in cpu_ranges:
        host[e["name"]] += float(e["dur"]) / 1e6
        calls[e["name"]] += 1
    # Kernel time inside each phase's GPU projection.
    k_sorted = sorted(k_iv)
    gpu_by_phase = defaultdict(float)
    import bisect

    starts = [a for a, _ in k_sorted]
    for r in gpu_ranges:
        a, b = float(r["ts"]), float(r["ts"]) + float(r["dur"])
        i = bisect.bisect_left(starts, a)
        while i < len(k_sorted) and k_sorted[i][0] < b:
            ka, kb = k_sorted[i]
            gpu_by_phase[r["name"]] += (min(kb, b) - ka) / 1e6
            i += 1
    for ph in PHASES:
        lines.append(f"| {ph} | {calls[ph]} | {host[ph]:.2f} | {gpu_by_phase[ph]:.2f} |")
    lines += ["", "| kernel kind | GPU s | share |", "|---|---|---|"]
    by_kind = defaultdict(float)
    by_name = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        d = float(e["dur"]) / 1e6
        by_kind[kernel_kind(e["name"])] += d
        by_name[e["name"]][0] += d
        by_name[e["name"]][1] += 1
    tot = sum(by_kind.values())
    for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {v:.2f} | {100 * v / tot:.0f}% |")
    lines += ["", "GPU busy per tenth of the span:", ""]
    slices = []
    for s in range(10):
        a, b = start + span * s / 10, start + span * (s + 1) / 10
        clipped = [(max(x, a), min(y, b)) for x, y in k_iv if y > a and x < b]
        slices.append(f"{100 * union_length(clipped) / (b - a):.0f}%")
    lines.append(" ".join(slices))
    lines += [
        "",
        "Per step (ms): gap before the step (schedule, update, frontend), host time of",
        "each phase, GPU busy inside the step's span; slow steps first (top 25):",
        "",
        "| t s | gap | encoder | prepare | forward | sample | span | GPU busy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    steps = step_table(cpu_ranges, k_sorted, starts)
    for row in sorted(steps, key=lambda r: -r["span"])[:25]:
        lines.append(
            f"| {(row['t'] - start) / 1e6:.2f} | {row['gap']:.1f} | {row['mm:encoder']:.1f} | "
            f"{row['mm:prepare']:.1f} | {row['mm:forward']:.1f} | {row['mm:sample']:.1f} | "
            f"{row['span']:.1f} | {row['busy']:.1f} |"
        )
    tot_gap = sum(r["gap"] for r in steps) / 1e3
    lines.append(f"\nsum of gaps between steps: {tot_gap:.2f} s over {len(steps)} steps")
    lines += ["", *runtime_calls_table(events, start, span)]
    lines += ["", "| top kernels | calls | GPU s |", "|---|---|---|"]
    for name, (d, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]:
        lines.append(f"| `{name[:90]}` | {n} | {d:.3f} |")
    return "\n".join(lines) + "\n"


def runtime_calls_table(events: list[dict], start: float, span: float, top: int = 12) -> list[str]:
    """Host time in CUDA runtime/driver calls by name, over the whole span and over its
    first fifth (where a run's first steps allocate, pin memory or synchronize)."""
    calls = [
        e for e in events if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")
    ]
    if not calls:
        return ["(no CUDA runtime calls in the trace)"]
    early_end = start + span / 5
    whole: dict[str, list] = defaultdict(lambda: [0, 0.0])
    early: dict[str, float] = defaultdict(float)
    for e in calls:
        d = float(e["dur"]) / 1e3
        whole[e["name"]][0] += 1
        whole[e["name"]][1] += d
        if float(e["ts"]) < early_end:
            early[e["name"]] += d
    lines = [
        "| CUDA runtime call | calls | host ms (whole span) | host ms (first fifth) |",
        "|---|---|---|---|",
    ]
    for name, (n, d) in sorted(whole.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"| `{name}` | {n} | {d:.1f} | {early.get(name, 0.0):.1f} |")
    return lines


def load_trace(path: Path) -> dict:
    """A Chrome trace as torch.profiler writes it, plain or gzipped."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def step_table(cpu_ranges: list[dict], k_sorted: list, starts: list) -> list[dict]:
    """One row per engine step (a step starts at its `mm:encoder` range)."""
    import bisect

    ranges = sorted(cpu_ranges, key=lambda e: float(e["ts"]))
    steps: list[dict] = []
    for e in ranges:
        a, d = float(e["ts"]), float(e["dur"])
        if e["name"] == "mm:encoder":
            steps.append({"t": a, "end": a + d, **dict.fromkeys(PHASES, 0.0)})
        if steps:
            steps[-1][e["name"]] += d / 1e3
            steps[-1]["end"] = max(steps[-1]["end"], a + d)
    prev_end = None
    for row in steps:
        row["gap"] = 0.0 if prev_end is None else (row["t"] - prev_end) / 1e3
        prev_end = row["end"]
        row["span"] = (row["end"] - row["t"]) / 1e3
        i = bisect.bisect_left(starts, row["t"])
        clipped = []
        while i < len(k_sorted) and k_sorted[i][0] < row["end"]:
            clipped.append((k_sorted[i][0], min(k_sorted[i][1], row["end"])))
            i += 1
        row["busy"] = union_length(clipped) / 1e3
    return steps


def triton_variants() -> dict[str, int]:
    """Compiled specializations of each of our Triton kernels in this process."""
    import mmkernels.activation
    import mmkernels.kv_cache
    import mmkernels.paged_attention
    import mmkernels.rms_norm
    import mmkernels.rotary

    counts = {}
    for mod in (
        mmkernels.activation,
        mmkernels.kv_cache,
        mmkernels.paged_attention,
        mmkernels.rms_norm,
        mmkernels.rotary,
    ):
        for name, fn in vars(mod).items():
            caches = getattr(fn, "device_caches", None)
            if caches is None:
                continue
            n = 0
            for entry in caches.values():
                cache = entry[0] if isinstance(entry, tuple) else entry
                n += len(cache) if hasattr(cache, "__len__") else 0
            counts[name] = n
    return counts


def media_only(ck: Path, args: argparse.Namespace) -> None:
    """Throughput of preprocessing alone: submit every W1 prompt, wait for all, decode."""
    from mmengine.input_processor import InputWorkers
    from mmengine.model_loader import read_config

    workers = InputWorkers(
        ck, read_config(ck), None, None, torch.bfloat16, num_workers=args.input_workers
    )
    warm = [
        workers.submit([VISION_START, IMAGE_PAD, VISION_END], {"image": im})
        for im, _ in w1_requests(2 * args.input_workers, 4, seed=7)
    ]
    for f in warm:
        f.result()
    reqs = w1_requests(args.num_requests, args.text_len)
    t0 = time.perf_counter()
    futs = [
        workers.submit([VISION_START, IMAGE_PAD, VISION_END] + t, {"image": im}) for im, t in reqs
    ]
    t_submit = time.perf_counter() - t0
    from mmengine.messages import msg_to_tensor

    nbytes = 0
    for f in futs:
        raw = f.result()
        nbytes += len(raw)
        # What the frontend and the engine core do with it: decode, then the pixels
        # (reading and deleting a shared-memory payload, or copying the inline bytes).
        for item in workers.decode(raw).mm_items:
            pixels = msg_to_tensor(item.pixel_values)
            if item.pixel_values.shm:  # inline pixels are already counted in len(raw)
                nbytes += pixels.numel() * pixels.element_size()
    wall = time.perf_counter() - t0
    workers.shutdown()
    print(
        f"media only: {args.num_requests} prompts with {args.input_workers} workers in "
        f"{wall:.2f} s ({args.num_requests / wall:.0f} prompts/s; submit loop {t_submit:.2f} s; "
        f"{nbytes / 2**20:.0f} MiB of messages and payloads)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--text-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--input-workers", type=int, default=8)
    ap.add_argument("--checkpoint", type=Path, default=None, help="reuse a saved checkpoint")
    ap.add_argument("--trace", action="store_true", help="also save the gzipped trace")
    ap.add_argument(
        "--warmup-requests",
        type=int,
        default=8,
        help="W1-style requests (16 text tokens) run before the profiled run",
    )
    ap.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="plan each step while the GPU runs the previous one (default: the engine's, on)",
    )
    ap.add_argument(
        "--media-only",
        action="store_true",
        help="time the input workers alone on the W1 images (no GPU work)",
    )
    ap.add_argument(
        "--analyse",
        type=Path,
        default=None,
        metavar="TRACE",
        help="only summarize a saved trace (.json or .json.gz, e.g. from LLM.start_profile / "
        "bench_mm_throughput.py --torch-profile) and exit",
    )
    args = ap.parse_args()
    if args.analyse is not None:
        print(analyse(load_trace(args.analyse), 0.0, None))
        return
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    ck = args.checkpoint or build_checkpoint(tmp)
    if args.media_only:
        media_only(ck, args)
        return

    from mmengine import LLM, SamplingParams

    llm = LLM(
        str(ck),
        dtype="bfloat16",
        device="cuda",
        skip_tokenizer_init=True,
        async_scheduling=args.async_scheduling,
        max_model_len=4096,
        max_num_batched_tokens=8192,
        num_input_workers=args.input_workers,
        multiprocess=False,
    )

    def prompts(rs):
        return [
            {
                "prompt_token_ids": [VISION_START, IMAGE_PAD, VISION_END] + text,
                "multi_modal_data": {"image": img},
            }
            for img, text in rs
        ]

    p = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts(w1_requests(args.warmup_requests, 16, seed=7)), p, use_tqdm=False)
    reqs = prompts(w1_requests(args.num_requests, args.text_len))
    from torch.profiler import ProfilerActivity, profile

    variants_before = triton_variants()
    gc_pauses = gc_pause_recorder()

    mem_before = torch.cuda.memory_stats()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        llm.generate(reqs, p, use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    stats = llm.stats()
    mem_after = torch.cuda.memory_stats()
    # Allocator churn during the run: retries (free every cached block, synchronize, try
    # again) and fresh cudaMalloc/cudaFree calls each cost host time on every step.
    churn = {
        k: mem_after.get(k, 0) - mem_before.get(k, 0)
        for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")
    }
    print(f"CUDA caching allocator during the run: {churn}", flush=True)
    gc_line = "Python GC during the run (generation: passes, total pause ms): " + ", ".join(
        f"gen{g}: {n}, {1e3 * t:.0f}" for g, (n, t) in sorted(gc_pauses.items())
    )
    print(gc_line, flush=True)
    variants_after = triton_variants()
    new_variants = {
        k: v - variants_before.get(k, 0)
        for k, v in variants_after.items()
        if v != variants_before.get(k, 0)
    }
    llm.shutdown()
    trace_path = tmp / "trace.json"
    t1 = time.perf_counter()
    prof.export_chrome_trace(str(trace_path))
    trace = json.loads(trace_path.read_text())
    report = [
        f"# W1 profile ({torch.cuda.get_device_name()}, {args.num_requests} requests, "
        f"in-process engine core, profiler on)",
        "",
        analyse(trace, wall, None),
        "",
        "engine stats: "
        + ", ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()
        ),
        gc_line,
        f"Triton kernel variants compiled during the run (JIT specializations): "
        f"{new_variants or 'none'}; before it: {variants_before}",
        f"(trace export + analysis {time.perf_counter() - t1:.0f} s)",
    ]
    text = "\n".join(report)
    print(text)
    (out / "profile_w1.md").write_text(text)
    if args.trace:
        with open(trace_path, "rb") as f, gzip.open(out / "profile_w1.json.gz", "wb") as g:
            shutil.copyfileobj(f, g)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
