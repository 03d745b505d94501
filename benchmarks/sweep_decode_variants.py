"""Decode attention at GQA 8:1: KV-cache layout, block size and tile, against same-size copies.

Issue 3's decode target (>= 80% of copy bandwidth at batch >= 16, context >= 1k, GQA 8:1,
head 128) was missed at 62-65%. The split count and the tile were ruled out as causes
(`sweep_decode_splits.py`). This sweep tries what is left outside the kernel's loop:
  - the cache layout: NHD ([blocks, block_size, kv_heads, head], each position's head row
    256 bytes, rows of one head 512 bytes apart with 2 KV heads) against HND (the same
    logical tensor stored as [blocks, kv_heads, block_size, head], so each (block, head)
    is one contiguous run of block_size x 256 bytes); the kernels take strides, so HND is
    only a different allocation;
  - the cache block size (16, 32, 64 positions);
  - a few (BLOCK_M, TILE_N, warps, stages) tiles;
at the engine's split count (the kernel's choice rounded down to a power of two) and at
twice that (engine tile only). Each cell is TB/s of K/V read + q read + out written per call, median over
CUDA-graph replays of calls on distinct inputs larger than L2 (as the engine runs decode),
next to a device copy moving the same bytes, timed the same way.

    python3 benchmarks/sweep_decode_variants.py    # ~3 minutes on an H100; $OUT/decode_variants.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_kernels import (  # noqa: E402
    HEAD_SIZE,
    bench_graph,
    copy_bandwidth,
    decode_calls,
    forced_launch_config,
)
from benchmarks.sweep_decode_splits import engine_splits, same_size_copy_tbps  # noqa: E402

# (batch, context): the shapes, the text benchmark's decode (~200 x 1.1k) and batch 1.
SHAPES = [(16, 1024), (16, 4096), (64, 4096), (192, 1152), (1, 1152)]
HQ, HKV = 16, 2
ENGINE_TILE = (16, 64, 4, 2)
TILES = [ENGINE_TILE, (16, 64, 2, 2), (16, 128, 4, 2), (16, 64, 4, 3), (16, 32, 4, 4)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replays", type=int, default=20)
    args = ap.parse_args(argv)
    import mmkernels.paged_attention as pa

    t0 = time.perf_counter()
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    copy_tbps, _ = copy_bandwidth(200)
    lines = [
        f"# decode attention variants, {torch.cuda.get_device_name(0)} ({sm} SMs), "
        f"1 GiB copy {copy_tbps:.2f} TB/s, {HQ}q/{HKV}kv head {HEAD_SIZE} bf16",
        "",
        "TB/s of K/V + q/out per call (CUDA-graph replays, inputs > L2). s: engine split "
        "count; 2s: twice it. tile = (BLOCK_M, TILE_N, warps, stages).",
        "",
        "| B | ctx | MB/call | same-size copy | layout | block | tile | s | TB/s @s "
        "| % of 1 GiB copy | % of same-size copy | TB/s @2s |",
        "|---" * 12 + "|",
    ]
    max_diff = 0.0
    for batch, ctx in SHAPES:
        auto = pa.choose_num_kv_splits(
            num_q_blocks=batch, num_kv_heads=HKV, max_query_len=1, max_seq_len=ctx, sm_count=sm
        )
        s = engine_splits(auto)
        variants = [("nhd", 16, t) for t in TILES] + [("hnd", 16, t) for t in TILES]
        variants += [(lay, bs, ENGINE_TILE) for lay in ("nhd", "hnd") for bs in (32, 64)]
        same = None
        for layout, block_size, tile in variants:
            with forced_launch_config(tile):
                row = []
                for splits in (s, 2 * s if s < 32 and tile == ENGINE_TILE else None):
                    if splits is None:
                        row.append(float("nan"))
                        continue
                    calls, nbytes = decode_calls(
                        batch, ctx, HQ, HKV, splits, block_size, layout, fused_merge=splits <= 8
                    )
                    if same is None:
                        same = same_size_copy_tbps(batch, ctx, HQ, HKV)
                    try:
                        row.append(nbytes / bench_graph(calls, args.replays) / 1e9)
                    except Exception as exc:  # e.g. shared memory: report, keep going
                        print(f"  {layout} bs={block_size} {tile} s={splits}: {exc!r}")
                        row.append(float("nan"))
                    if splits == s and tile == ENGINE_TILE:
                        # Same seeds are not shared across layouts, so check each variant
                        # against the torch reference on its own inputs instead.
                        c = calls[0]
                        out = c()
                        ref = pa.paged_attention_torch(
                            *c.args, **{k: v for k, v in c.keywords.items() if k != "out"}
                        )
                        max_diff = max(max_diff, (out.float() - ref.float()).abs().max().item())
                    del calls
            at_s, at_2s = row
            lines.append(
                f"| {batch} | {ctx} | {nbytes / 1e6:.1f} | {same:.2f} | {layout} | {block_size} "
                f"| {tile} | {s} | {at_s:.2f} | {100 * at_s / copy_tbps:.0f}% "
                f"| {100 * at_s / same:.0f}% | {at_2s:.2f} |"
            )
            print(lines[-1], f"[{time.perf_counter() - t0:.0f}s]", flush=True)
        torch.cuda.empty_cache()
    lines += ["", f"Largest |kernel - torch reference| over the checked variants: {max_diff:.2e}."]
    lines.append(f"Run time {time.perf_counter() - t0:.0f} s.")
    text = "\n".join(lines) + "\n"
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_variants.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
