"""Mixed-step attention: prompt chunks with decodes riding along, by tile and launch order.

The text benchmark's prefill steps carry up to ~200 decodes beside ~8000 prompt tokens. In
one H100 profile (session 15, `profile_llm_steps.py --mixed-decodes 192`) the mixed step's
attention took 11.90 ms against 5.68 ms for 8 x 1024 prompt tokens alone, while the
decodes' K/V (192 x 1152 positions) streams in ~2.7 ms at the card's read rate. In a mixed
launch every sequence gets the prompt tiles (128 query rows x 128 positions, 8 warps, 3
stages: one program an SM), so each decode is a whole SM for its 8 useful rows; and the
scheduler puts decodes first in the batch, which `longest_first` launches last: a tail.

Variants, each one launch unless named otherwise:
  - engine: the batch as the engine builds it (decodes first), the engine's tiles;
  - prompts first: the same sequences with the decodes last in the batch (launched first);
  - no reversal: decodes first, `longest_first=False`;
  - forced tiles (BLOCK_M x TILE_N, warps, stages), decodes first;
  - two launches: the prompts alone plus the decodes alone, each with the engine's choice
    (split-KV for the decodes);
  - and the two parts alone, for reference.
Cells are microseconds per layer call (`triton.testing.do_bench` median, L2 flushed).

    python3 benchmarks/sweep_mixed_attention.py [--decodes 0,64,192] [--ctx 1152]
        [--prompts 7] [--prompt-len 1024]

Writes $OUT/mixed_attention.md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_kernels import (  # noqa: E402
    BLOCK_SIZE,
    DTYPE,
    HEAD_SIZE,
    bench,
    forced_launch_config,
)
from benchmarks.report import write_report  # noqa: E402

HQ, HKV = 16, 2  # Qwen2.5-3B
TILES = ((128, 128, 8, 3), (256, 64, 16, 2), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2),
         (64, 64, 8, 3), (64, 32, 4, 3))  # fmt: skip


def mixed_batch(q_lens: list[int], seq_lens: list[int], device: str = "cuda") -> dict:
    """Paged inputs for sequences with these query chunk and total lengths (fresh prompts
    have seq_len == q_len; decodes q_len 1), their cache blocks shuffled."""
    blocks = [-(-s // BLOCK_SIZE) for s in seq_lens]
    width = max(blocks)
    perm = torch.randperm(sum(blocks), device=device, dtype=torch.int32)
    table = torch.zeros(len(seq_lens), width, device=device, dtype=torch.int32)
    at = 0
    for i, b in enumerate(blocks):
        table[i, :b] = perm[at : at + b]
        at += b
    shape = (sum(blocks), BLOCK_SIZE, HKV, HEAD_SIZE)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    return dict(
        q=torch.randn(qsl[-1], HQ, HEAD_SIZE, device=device, dtype=DTYPE),
        key_cache=torch.randn(shape, device=device, dtype=DTYPE),
        value_cache=torch.randn(shape, device=device, dtype=DTYPE),
        block_tables=table,
        query_start_loc=torch.tensor(qsl, device=device, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, device=device, dtype=torch.int32),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
    )


def call(batch: dict, tile=None, **kwargs):  # noqa: ANN001, ANN201
    """One paged_attention call on `batch`, optionally with forced tiles."""
    import mmkernels.paged_attention as pa

    def run() -> torch.Tensor:
        with forced_launch_config(tile) if tile else contextlib.nullcontext():
            return pa.paged_attention(**batch, scale=HEAD_SIZE**-0.5, **kwargs)

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--decodes", type=lambda s: [int(x) for x in s.split(",")], default=[0, 32, 64, 128, 192]
    )
    p.add_argument("--ctx", type=int, default=1152)
    p.add_argument("--prompts", type=int, default=7)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--rep-ms", type=int, default=60)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(0)
    lines = [
        f"# Mixed-step attention on {name}: {args.prompts} prompts x {args.prompt_len} "
        f"tokens + decodes at context {args.ctx}, {HQ}q/{HKV}kv, head {HEAD_SIZE}",
        "",
        "us per call (do_bench median, L2 flushed). Tiles: BLOCK_M x TILE_N, warps, stages.",
        "",
    ]
    prompt_q = [args.prompt_len] * args.prompts
    prompts = mixed_batch(prompt_q, prompt_q)
    alone_prompts = bench(call(prompts), args.rep_ms)
    for d in args.decodes:
        dec_q, dec_s = [1] * d, [args.ctx] * d
        first = mixed_batch(dec_q + prompt_q, dec_s + prompt_q)
        last = mixed_batch(prompt_q + dec_q, prompt_q + dec_s)
        decodes = mixed_batch(dec_q, dec_s) if d else None
        ref = call(first)().float()
        rows: list[tuple[str, float]] = [
            ("engine (decodes first, longest_first)", bench(call(first), args.rep_ms)),
            ("prompts first (decodes launched first)", bench(call(last), args.rep_ms)),
            ("decodes first, no reversal", bench(call(first, longest_first=False), args.rep_ms)),
        ]
        for tile in TILES:
            try:
                out = call(first, tile)().float()
                diff = (out - ref).abs().max().item()
                us = bench(call(first, tile), args.rep_ms)
                rows.append(
                    (f"tiles {tile[0]}x{tile[1]}, {tile[2]}w, {tile[3]}s (diff {diff:.1e})", us)
                )
            except Exception as exc:  # noqa: BLE001 (out of shared memory: skip)
                print(f"  tile {tile}: {type(exc).__name__}", flush=True)
        if decodes is not None:

            def both(prompts=prompts, decodes=decodes) -> None:
                call(prompts)()
                call(decodes)()

            rows += [
                ("two launches (prompts, then decodes)", bench(both, args.rep_ms)),
                ("prompts alone", alone_prompts),
                ("decodes alone", bench(call(decodes), args.rep_ms)),
            ]
        kv_mb = d * args.ctx * HKV * HEAD_SIZE * 2 * 2 / 1e6
        lines += [
            f"## {d} decodes ({kv_mb:.0f} MB of their K/V)",
            "",
            "| variant | us | vs engine |",
            "|---|---|---|",
        ]
        base = rows[0][1]
        for label, us in rows:
            lines.append(f"| {label} | {1e3 * us:.1f} | {100 * (us / base - 1):+.0f}% |")
        lines.append("")
        print(
            f"[{time.perf_counter() - t0:.0f} s] {d} decodes: "
            + "; ".join(f"{label} {1e3 * us:.1f}" for label, us in rows),
            flush=True,
        )
        del first, last, decodes
        torch.cuda.empty_cache()
    write_report("mixed_attention", "\n".join(lines))


if __name__ == "__main__":
    main()
