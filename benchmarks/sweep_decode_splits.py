"""Decode attention: achieved bandwidth for every KV split count and a few tile configs.

Finds how the split count should be chosen (issue 3: GQA 8:1 decode reached 62% of copy
bandwidth). Each row is one (shape, launch config); columns are split counts; the cell is
TB/s of K/V + q/out bytes, timed as CUDA-graph replays over inputs larger than L2.

    python3 benchmarks/sweep_decode_splits.py [--out decode_sweep.md]

`--compare-fused` instead times, for each shape, the split path with the merge fused into
the split kernel (the default) against the two-launch merge, over a set of split counts
that includes the automatic choice, the engine's power-of-two choice and the best one;
same graphs, same inputs, engine tiles. It prints markdown tables and writes them to
$OUT/decode_fused_merge.md (OUT defaults to /tmp/out); about 2 minutes on an H100, mostly
compiling kernel variants.

    python3 benchmarks/sweep_decode_splits.py --compare-fused
"""

from __future__ import annotations

import argparse
import functools
import os
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

SHAPES = [  # (batch, context, q heads, kv heads)
    (16, 1024, 16, 2),
    (16, 4096, 16, 2),
    (4, 8192, 16, 2),
    (64, 1024, 16, 2),
    (16, 4096, 32, 8),
    (64, 1024, 32, 8),
]
SPLITS = (1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 20, 24, 32)
CONFIGS = [(16, 64, 4, 2), (16, 32, 4, 2), (16, 64, 4, 3), (16, 128, 8, 2)]
# --compare-fused: splits timed for both merges, besides each shape's automatic and engine
# choices (every distinct count compiles two kernel variants, so the list stays short).
COMPARE_SPLITS = (2, 3, 4, 8, 16, 24, 32)


def same_size_copy_tbps(batch: int, ctx: int, hq: int, hkv: int) -> float:
    """TB/s of device copies moving as many bytes (read + write) as one decode step, as
    CUDA-graph replays over distinct buffers larger than L2 together: the bandwidth a
    kernel of this size can reach, launch and ramp-up included."""
    _, nbytes = decode_calls(batch, ctx, hq, hkv, 1)
    n = nbytes // 4  # bf16 elements per side: nbytes / 2 read + nbytes / 2 written
    copies = min(max(2, -(-200 * 2**20 // nbytes)), 16)
    pairs = [
        (
            torch.empty(n, device="cuda", dtype=torch.bfloat16),
            torch.empty(n, device="cuda", dtype=torch.bfloat16),
        )
        for _ in range(copies)
    ]
    ms = bench_graph([lambda d=d, s=s: d.copy_(s) for s, d in pairs], 10)
    return 4 * n / ms / 1e9


def engine_splits(auto: int) -> int:
    """The split count the engine uses for a decode batch whose automatic choice is `auto`
    (mmengine.attention.decode_kv_splits: rounded down to a power of two)."""
    return 1 << (max(auto, 1).bit_length() - 1)


def compare_fused(splits: tuple[int, ...], replays: int) -> str:
    """Fused vs two-launch merge for every shape of SHAPES; returns the markdown report."""
    import mmkernels.paged_attention as pa

    t0 = time.perf_counter()
    copy_tbps, _ = copy_bandwidth(200)
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    summary = [
        f"# fused vs two-launch split merge on {torch.cuda.get_device_name(0)} ({sm} SMs), "
        f"1 GiB copy {copy_tbps:.2f} TB/s",
        "",
        "TB/s of K/V + q/out bytes per call, median of CUDA-graph replays over inputs larger "
        "than L2; engine tiles. auto: the kernel's split choice; engine: auto rounded down "
        "to a power of two (what the engine's decode graphs use); best: the best timed "
        "split of each merge. max diff: largest |fused - two-launch| output difference (bf16) "
        "at the auto split (s=4 where auto is 1).",
        "",
        "| shape | MB/call | same-size copy | no split | auto s | two-launch @auto "
        "| fused @auto | fused gain @auto | engine s | two-launch @engine | fused @engine "
        "| best two-launch | best fused | best fused % of same-size copy | max diff |",
        "|---" * 15 + "|",
    ]
    detail_rows = []
    for batch, ctx, hq, hkv in SHAPES:
        shape = f"B={batch} ctx={ctx} {hq}q/{hkv}kv"
        auto = pa.choose_num_kv_splits(
            num_q_blocks=batch, num_kv_heads=hkv, max_query_len=1, max_seq_len=ctx, sm_count=sm
        )
        engine = engine_splits(auto)
        same = same_size_copy_tbps(batch, ctx, hq, hkv)
        calls, nbytes = decode_calls(batch, ctx, hq, hkv, None)

        def tbps(num_kv_splits: int, fused: bool, calls=calls, nbytes=nbytes) -> float:
            fns = [
                functools.partial(c, num_kv_splits=num_kv_splits, fused_merge=fused) for c in calls
            ]
            try:
                return nbytes / bench_graph(fns, replays) / 1e9
            except Exception as exc:  # keep the rest of the run; the cell reads nan
                print(f"  s={num_kv_splits} fused={fused}: {exc!r}", flush=True)
                return float("nan")

        # Same inputs, both merges: the outputs must agree (only the fp32 summation order
        # of the merge differs).
        check = auto if auto > 1 else 4
        ref = calls[0](num_kv_splits=check, fused_merge=False).float()
        diff = (calls[0](num_kv_splits=check, fused_merge=True).float() - ref).abs().max().item()

        no_split = tbps(1, True)  # one kernel, no merge: the same for both
        timed = {(1, False): no_split, (1, True): no_split}
        for s in sorted({*splits, auto, engine} - {1}):
            for fused in (False, True):  # interleaved, so drift hits both alike
                timed[s, fused] = tbps(s, fused)
        del calls
        best = {
            fused: max(
                ((v, s) for (s, f), v in timed.items() if f == fused and s > 1 and v == v),
                default=(float("nan"), 0),
            )
            for fused in (False, True)
        }
        cell = {key: f"{v:.2f}" for key, v in timed.items()}
        gain = timed[auto, True] / timed[auto, False] - 1
        gain_text = f"{100 * gain:+.1f}%" if auto > 1 else "– (no split)"
        summary.append(
            f"| {shape} | {nbytes / 1e6:.1f} | {same:.2f} | {no_split:.2f} | {auto} "
            f"| {cell[auto, False]} | {cell[auto, True]} | {gain_text} | {engine} "
            f"| {cell[engine, False]} | {cell[engine, True]} "
            f"| {best[False][0]:.2f} (s={best[False][1]}) | {best[True][0]:.2f} "
            f"(s={best[True][1]}) | {100 * best[True][0] / same:.0f}% | {diff:.1e} |"
        )
        cols = sorted({s for s, _ in timed} - {1})
        for fused in (False, True):
            name = "fused" if fused else "two-launch"
            detail_rows.append(
                (cols, f"| {shape} | {name} | " + " | ".join(cell[s, fused] for s in cols) + " |")
            )
        print(
            f"{shape}: auto s={auto} two-launch {cell[auto, False]} fused {cell[auto, True]} "
            f"TB/s ({gain_text}); best fused {best[True][0]:.2f} at s={best[True][1]} "
            f"= {100 * best[True][0] / same:.0f}% of a same-size copy ({same:.2f}); "
            f"max diff {diff:.1e}; {time.perf_counter() - t0:.0f}s so far",
            flush=True,
        )

    detail = ["", "## TB/s per split count"]
    last_cols = None
    for cols, row in detail_rows:
        if cols != last_cols:  # a header whenever the timed splits change
            detail += [
                "",
                "| shape | merge | " + " | ".join(f"s={s}" for s in cols) + " |",
                "|---" * (len(cols) + 2) + "|",
            ]
            last_cols = cols
        detail.append(row)
    footer = ["", f"Total run time {time.perf_counter() - t0:.0f} s."]
    return "\n".join(summary + detail + footer) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("decode_sweep.md"))
    p.add_argument("--default-config-only", action="store_true", help="skip the other tiles")
    p.add_argument(
        "--compare-fused",
        action="store_true",
        help="time the fused split merge against the two-launch merge instead of sweeping "
        "tiles; writes $OUT/decode_fused_merge.md",
    )
    p.add_argument(
        "--splits",
        type=lambda text: tuple(int(x) for x in text.split(",")),
        default=COMPARE_SPLITS,
        help="--compare-fused: comma-separated split counts to time besides auto and engine "
        f"(default {','.join(map(str, COMPARE_SPLITS))})",
    )
    p.add_argument(
        "--replays", type=int, default=20, help="--compare-fused: graph replays per timing"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.compare_fused:
        report = compare_fused(args.splits, args.replays)
        out_dir = Path(os.environ.get("OUT") or "/tmp/out")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "decode_fused_merge.md").write_text(report)
        print(report)
        print(f"written to {out_dir / 'decode_fused_merge.md'}")
        return
    configs = CONFIGS[:1] if args.default_config_only else CONFIGS
    import mmkernels.paged_attention as pa

    copy_tbps, _ = copy_bandwidth(200)
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    lines = [
        f"# decode split sweep on {torch.cuda.get_device_name(0)} ({sm} SMs), "
        f"copy {copy_tbps:.2f} TB/s",
        "",
        "| shape | config | same-size copy | auto | " + " | ".join(f"s={s}" for s in SPLITS) + " |",
        "|---" * (len(SPLITS) + 4) + "|",
    ]
    for batch, ctx, hq, hkv in SHAPES:
        auto = pa.choose_num_kv_splits(
            num_q_blocks=batch,
            num_kv_heads=hkv,
            max_query_len=1,
            max_seq_len=ctx,
            sm_count=sm,
        )
        same = same_size_copy_tbps(batch, ctx, hq, hkv)
        for config in configs:
            cells = []
            best = (0.0, 0)
            for s in SPLITS:
                try:
                    calls, nbytes = decode_calls(batch, ctx, hq, hkv, s)
                    with forced_launch_config(config):
                        ms = bench_graph(calls, 10)
                    tbps = nbytes / ms / 1e9
                    del calls
                except Exception as exc:  # e.g. out of shared memory
                    cells.append(type(exc).__name__)
                    continue
                cells.append(f"{tbps:.2f}")
                best = max(best, (tbps, s))
            shape = f"B={batch} ctx={ctx} {hq}q/{hkv}kv"
            lines.append(
                f"| {shape} | {config} | {same:.2f} | {auto} | " + " | ".join(cells) + " |"
            )
            print(
                f"{shape} {config}: best s={best[1]} {best[0]:.2f} TB/s "
                f"({100 * best[0] / copy_tbps:.0f}% of the 1 GiB copy, "
                f"{100 * best[0] / same:.0f}% of a same-size copy at {same:.2f}); "
                f"auto={auto}",
                flush=True,
            )
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
