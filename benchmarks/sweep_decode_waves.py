"""Decode attention across batch sizes: where one more row costs a whole wave (issue 3).

Session 15 (H200, `profile_llm_steps.py --batches 192,208 --prefill-seqs 0`): the same 36
decode attention launches took 2.254 ms at 192 sequences and 3.394 ms at 208 (+51% for +8%
rows). Neither batch splits KV (2 KV heads x 192 = 384 programs, past the no-split bound),
and a decode program with 64-wide tiles and two pipeline stages takes ~64 KiB of shared
memory: 3 programs an SM, 396 on 132 SMs. 384 programs are one wave; 416 are a full wave and
a 20-program tail that streams at a fraction of the card's bandwidth. The text benchmark's
decode steps (~200 rows, replaying the 208 graph) pay that tail on every layer.

This sweep times one decode step at many batch sizes around those wave edges, for split
counts and tiles, to choose the split count from the wave count rather than a fixed
programs-per-SM bound. Each cell is microseconds per call (median of CUDA-graph replays
over inputs larger than L2) and, after the slash, TB/s of K/V + q/out bytes.

    python3 benchmarks/sweep_decode_waves.py [--shapes 16:2:1152,28:4:1152]
        [--batches 128,192,200,208,...]

Writes $OUT/decode_waves.md.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_kernels import (  # noqa: E402
    bench_graph,
    copy_bandwidth,
    decode_calls,
    forced_launch_config,
)
from benchmarks.report import write_report  # noqa: E402

BATCHES = (64, 128, 160, 192, 198, 200, 208, 232, 256, 264, 288, 320, 384, 396, 400, 448, 512)
# (label, splits, merge, forced (BLOCK_M, TILE_N, num_warps, num_stages) or None = engine's)
VARIANTS = (
    ("engine", None, None, None),
    ("s1", 1, None, None),
    ("s1 n32x2", 1, None, (16, 32, 4, 2)),
    ("s1 n32x3", 1, None, (16, 32, 4, 3)),
    ("s2", 2, True, None),
    ("s4", 4, True, None),
    ("s8", 8, True, None),
    ("s16", 16, False, None),
)


def parse_shape(text: str) -> tuple[int, int, int]:
    hq, hkv, ctx = (int(x) for x in text.split(":"))
    return hq, hkv, ctx


def run(shapes: list[tuple[int, int, int]], batches: list[int], replays: int) -> str:
    import mmkernels.paged_attention as pa

    t0 = time.perf_counter()
    copy_tbps, _ = copy_bandwidth(200)
    props = torch.cuda.get_device_properties(0)
    sm = props.multi_processor_count
    lines = [
        f"# Decode attention across batch sizes on {props.name} ({sm} SMs), "
        f"1 GiB copy {copy_tbps:.2f} TB/s",
        "",
        "us per call / TB/s (K/V + q/out bytes), median of CUDA-graph replays over inputs "
        "larger than L2; head 128, bf16, block 16. engine: the engine's own split choice "
        "(shown in brackets). sN: N splits, engine tiles, merge fused up to 8 splits. "
        "n32xS: one split, 32-wide tiles, S pipeline stages (less shared memory a program, "
        "more programs an SM). Bold: the fastest of the row.",
        "",
    ]
    for hq, hkv, ctx in shapes:
        lines += [
            f"## {hq}q/{hkv}kv, context {ctx}",
            "",
            "| batch | programs (no split) | "
            + " | ".join(label for label, *_ in VARIANTS)
            + " | best | engine vs best |",
            "|---" * (len(VARIANTS) + 4) + "|",
        ]
        for batch in batches:
            auto = pa.choose_num_kv_splits(  # the engine's choice: decode, graph at ctx
                num_q_blocks=batch, num_kv_heads=hkv, max_query_len=1, max_seq_len=ctx, sm_count=sm
            )
            calls, nbytes = decode_calls(batch, ctx, hq, hkv, None)
            # The engine's split choice must give the unsplit result (up to the merge's
            # fp32 summation order).
            ref = calls[0](num_kv_splits=1).float()
            diff = (calls[0](num_kv_splits=auto).float() - ref).abs().max().item()
            if diff > 2e-2:
                raise AssertionError(f"B={batch}: {auto} splits differ from 1 by {diff}")
            cells: dict[str, float] = {}
            for label, splits, merge, config in VARIANTS:
                fns = [
                    functools.partial(
                        c, num_kv_splits=splits if splits else auto, fused_merge=merge
                    )
                    for c in calls
                ]
                try:
                    if config is None:
                        ms = bench_graph(fns, replays)
                    else:
                        with forced_launch_config(config):
                            ms = bench_graph(fns, replays)
                except Exception as exc:  # keep the sweep; the cell reads nan
                    print(f"  B={batch} {label}: {exc!r}", flush=True)
                    ms = float("nan")
                cells[label] = ms
            del calls
            torch.cuda.empty_cache()
            finite = {k: v for k, v in cells.items() if v == v}
            best = min(finite, key=finite.get)
            row = []
            for label, *_ in VARIANTS:
                ms = cells[label]
                text = f"{1e3 * ms:.1f} / {nbytes / ms / 1e9:.2f}"
                if label == "engine":
                    text += f" [s{auto}]"
                row.append(f"**{text}**" if label == best else text)
            lines.append(
                f"| {batch} | {batch * hkv} | "
                + " | ".join(row)
                + f" | {best} | {100 * (cells['engine'] / cells[best] - 1):+.0f}% |"
            )
            print(
                f"[{time.perf_counter() - t0:.0f} s] {hq}q/{hkv}kv ctx={ctx} B={batch}: "
                + " ".join(f"{k}={1e3 * v:.1f}" for k, v in cells.items()),
                flush=True,
            )
        lines.append("")
    lines.append(f"Total run time {time.perf_counter() - t0:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--shapes",
        type=lambda s: [parse_shape(x) for x in s.split(",")],
        default=[(16, 2, 1152), (28, 4, 1152)],
        help="comma-separated q_heads:kv_heads:context (default 16:2:1152,28:4:1152)",
    )
    p.add_argument(
        "--batches",
        type=lambda s: [int(x) for x in s.split(",")],
        default=list(BATCHES),
    )
    p.add_argument("--replays", type=int, default=20)
    args = p.parse_args(argv)
    write_report("decode_waves", run(args.shapes, args.batches, args.replays))


if __name__ == "__main__":
    main()
