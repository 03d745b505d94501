"""Decode attention: achieved bandwidth for every KV split count and a few tile configs.

Finds how the split count should be chosen (issue 3: GQA 8:1 decode reached 62% of copy
bandwidth). Each row is one (shape, launch config); columns are split counts; the cell is
TB/s of K/V + q/out bytes, timed as CUDA-graph replays over inputs larger than L2.

    python3 benchmarks/sweep_decode_splits.py [--out decode_sweep.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_kernels import bench_graph, copy_bandwidth, decode_calls  # noqa: E402

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("decode_sweep.md"))
    p.add_argument("--default-config-only", action="store_true", help="skip the other tiles")
    args = p.parse_args()
    configs = CONFIGS[:1] if args.default_config_only else CONFIGS
    import kernels.paged_attention as pa

    copy_tbps, _ = copy_bandwidth(200)
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    lines = [
        f"# decode split sweep on {torch.cuda.get_device_name(0)} ({sm} SMs), "
        f"copy {copy_tbps:.2f} TB/s",
        "",
        "| shape | config | same-size copy | auto | " + " | ".join(f"s={s}" for s in SPLITS) + " |",
        "|---" * (len(SPLITS) + 4) + "|",
    ]
    original = pa._launch_config
    try:
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
                pa._launch_config = lambda *_, c=config: c
                cells = []
                best = (0.0, 0)
                for s in SPLITS:
                    try:
                        calls, nbytes = decode_calls(batch, ctx, hq, hkv, s)
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
    finally:
        pa._launch_config = original
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
