"""What sampling costs per step, next to the forward it follows (issue 3).

Times `mmengine.sampler.sample_async` on random fp32 logits of a Qwen-sized vocabulary for
batch sizes and the usual settings: greedy, temperature, temperature + top-p, + top-k,
+ min-p, all of them with logprobs, and seeded rows. Each is the GPU time of the sampler's
kernels (CUDA events, median of replays; the host only launches), beside the time to
read the logits once at the card's read rate (a floor for any single pass over them).
The text benchmark samples greedily; served traffic mostly does not.

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

from mmengine.sampler import SamplingRow, sample_async  # noqa: E402

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
            gen = torch.Generator(device=device)
            gen.manual_seed(setting["seed"] + i)
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


def time_ms(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up (allocations, lazy init)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
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


def read_rate(device: torch.device) -> float | None:
    """Bytes per second of a large sum on the GPU (None on the CPU)."""
    if device.type != "cuda":
        return None
    x = torch.randn(1 << 28, device=device)
    ms = time_ms(x.sum, device, 20)
    return x.numel() * 4 / ms * 1e3


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
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rate = read_rate(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    cols = " | ".join(f"B={b} ms" for b in args.batches)
    lines = [
        f"### Sampler time per step, {name}, vocab {args.vocab}, fp32 logits",
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
            ms = time_ms(
                lambda logits=logits, rows=rows: sample_async(logits, rows), device, args.reps
            )
            cells.append(f"{ms:.3f}")
        lines.append(f"| {label} | {' | '.join(cells)} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampler.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
