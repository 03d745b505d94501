"""What sampling costs per step, next to the forward it follows (issue 3).

Times `mmengine.sampler.sample_async` on random fp32 logits of a Qwen-sized vocabulary for
batch sizes and the usual settings: greedy, temperature, temperature + top-p, + top-k,
+ min-p, all of them with logprobs, and seeded rows. Each cell is the GPU time of the
sampler's kernels (CUDA events, median of replays) and, in brackets, the host time of the
call. The GPU time is measured behind a ~5 ms GPU sleep, so the host has queued every
kernel before the first runs and host gaps do not count (in the engine the host runs a
step ahead of the GPU). Beside them, the time to read the logits once at the card's read
rate: a floor for any single pass over them. The text benchmark samples greedily; served
traffic mostly does not.

    python3 benchmarks/bench_sampler.py [--batches 1,16,64,256] [--vocab 151936]
        [--device cuda]        # --device cpu runs the same on the CPU (no floor column)

Writes $OUT/sampler.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmengine.sampler import SamplingRow, SeedStream, sample_async  # noqa: E402

SETTINGS = {
    "greedy": {"temperature": 0.0},
    "temperature 0.8": {"temperature": 0.8},
    "+ top-p 0.9": {"temperature": 0.8, "top_p": 0.9},
    "+ top-k 50": {"temperature": 0.8, "top_k": 50},
    "+ min-p 0.05": {"temperature": 0.8, "min_p": 0.05},
    "top-p + top-k + logprobs 5": {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "logprobs": 5},
    "temperature 0.8, seeded": {"temperature": 0.8, "seed": 0},
}


def make_rows(n: int, setting: dict, device: torch.device) -> list[SamplingRow]:
    rows = []
    for i in range(n):
        gen = None
        if "seed" in setting:
            gen = SeedStream(setting["seed"] + i)
        rows.append(
            SamplingRow(
                temperature=setting["temperature"],
                top_k=setting.get("top_k", 0),
                top_p=setting.get("top_p", 1.0),
                min_p=setting.get("min_p", 0.0),
                presence_penalty=0.0,
                frequency_penalty=0.0,
                repetition_penalty=1.0,
                generator=gen,
                num_logprobs=setting.get("logprobs"),
                blocked_token_ids=[],
                prompt_token_ids=[],
                output_token_ids=[],
            )
        )
    return rows


def time_ms(fn, device: torch.device, reps: int, behind_sleep: bool = False) -> float:
    """Median milliseconds of `fn()`: GPU time between CUDA events on a GPU, wall time on
    the CPU. With `behind_sleep`, the events follow a GPU sleep of ~5 ms, so the time is
    the kernels' alone (as long as the host queues them in less than that)."""
    fn()  # warm-up (allocations, lazy init)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if behind_sleep:
                torch.cuda._sleep(10_000_000)  # cycles: ~5 ms at 2 GHz
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_ms(fn, device: torch.device, reps: int) -> float:
    """Median host milliseconds of `fn()` (the GPU work it queues is not waited for)."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def read_rate(device: torch.device) -> float | None:
    """Bytes per second of a large sum on the GPU (None on the CPU)."""
    if device.type != "cuda":
        return None
    x = torch.randn(1 << 28, device=device)
    ms = time_ms(x.sum, device, 20)
    return x.numel() * 4 / ms * 1e3


# Per setting: every row's (top_k, top_p, min_p) at temperature 0.8. Min-p and top-p are
# per-row switches in the kernel; top-k also a batch-wide one (`use_top_k`).
KERNEL_SETTINGS = {
    "temperature": (0, 1.0, 0.0),
    "top-p 0.9": (0, 0.9, 0.0),
    "top-k 50": (50, 1.0, 0.0),
    "min-p + top-k + top-p": (50, 0.9, 0.05),
}


def _kernel_call(ks, logits: torch.Tensor, setting: tuple[int, float, float]):
    b, dev = logits.shape[0], logits.device
    top_k, top_p, min_p = setting

    def full(v: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.full((b,), v, dtype=dtype, device=dev)

    args = (full(0.8), full(top_k, torch.long), full(top_p), full(min_p))
    seeds = torch.arange(b, device=dev)
    return lambda: ks.sample_from_logits(logits, *args, seeds, use_top_k=top_k > 0)


def kernel_sweep(
    batches: list[int], vocab: int, device: torch.device, reps: int, sweep: bool
) -> list[str]:
    """GPU time of `mmkernels.sampling.sample_from_logits` alone (parameters already on the
    device), per setting and batch, at the default launch config and, with `sweep`, at
    other loop widths and warp counts."""
    import mmkernels.sampling as ks

    configs = [(ks._BLOCK, ks._NUM_WARPS)]
    if sweep:
        configs += [(2048, 16), (4096, 8), (4096, 16), (8192, 8), (8192, 16)]
        configs = list(dict.fromkeys(configs))
    cols = " | ".join(f"B={b} ms" for b in batches)
    lines = [
        "",
        "### The sampling kernel alone (temperature 0.8, min-p 0.05, top-k 50, top-p 0.9 as"
        " switched on)",
        "",
        f"| setting | loop width x warps | {cols} |",
        "|---|---" + "|---" * len(batches) + "|",
    ]
    default = configs[0]
    gen = torch.Generator(device=device).manual_seed(1)
    for label, setting in KERNEL_SETTINGS.items():
        for block, warps in configs:
            ks._BLOCK, ks._NUM_WARPS = block, warps
            cells = []
            for b in batches:
                logits = torch.randn(b, vocab, device=device, generator=gen) * 3
                call = _kernel_call(ks, logits, setting)
                ms = time_ms(call, device, reps, behind_sleep=True)
                cells.append(f"{ms:.3f}")
            mark = " (default)" if (block, warps) == default else ""
            lines.append(f"| {label} | {block} x {warps}{mark} | {' | '.join(cells)} |")
            print(lines[-1], flush=True)
    ks._BLOCK, ks._NUM_WARPS = default
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--batches", default="1,16,64,256", type=lambda s: [int(x) for x in s.split(",")]
    )
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument(
        "--sweep", action="store_true", help="also time the kernel's loop width and warp count"
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rate = read_rate(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    cols = " | ".join(f"B={b} ms" for b in args.batches)
    lines = [
        f"### Sampler time per step, {name}, vocab {args.vocab}, fp32 logits: GPU ms"
        + (" (host ms)" if device.type == "cuda" else ""),
        "",
        f"| setting | {cols} |",
        "|---" * (len(args.batches) + 1) + "|",
    ]
    if rate is not None:
        floors = " | ".join(f"{b * args.vocab * 4 / rate * 1e3:.3f}" for b in args.batches)
        lines.append(f"| one read of the logits (floor of a pass) | {floors} |")
    gen = torch.Generator(device=device).manual_seed(0)
    for label, setting in SETTINGS.items():
        cells = []
        for b in args.batches:
            logits = torch.randn(b, args.vocab, device=device, generator=gen) * 3
            rows = make_rows(b, setting, device)
            call = lambda logits=logits, rows=rows: sample_async(logits, rows)  # noqa: E731
            ms = time_ms(call, device, args.reps, behind_sleep=True)
            if device.type == "cuda":
                cells.append(f"{ms:.3f} ({host_ms(call, device, args.reps):.3f})")
            else:
                cells.append(f"{ms:.3f}")
        lines.append(f"| {label} | {' | '.join(cells)} |")
        print(lines[-1], flush=True)
    if device.type == "cuda":
        lines += kernel_sweep(args.batches, args.vocab, device, args.reps, args.sweep)
    text = "\n".join(lines) + "\n"
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampler.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
