"""Decode-batch projections (16-256 rows): cuBLAS against a Triton tensor-core GEMM (issue 3).

A decode step of B sequences multiplies a B-row activation by every weight of the model. At
16-64 rows that is a weight stream (memory-bound); at ~200 rows (the text benchmark's decode
steps) the FLOPs catch up with the bytes (Qwen2.5-3B: 1.33 ms of weight reads vs ~1.3 ms of
bf16 matmul per step on an H200). The decode graphs' GEMMs run well above both: at 192 rows
cuBLAS took 2.54 ms (profile_llm_steps.py, session 15), its down projection a split-K
96 x 64 tile plus a reduce kernel.

This benchmark asks whether a plain Triton GEMM tuned for few rows does better before any
engine work: for each of Qwen2.5-3B's four projections and each row count, 36 distinct
weights (one per layer, so nothing is served from L2) run back to back in one CUDA graph;
cells are GPU microseconds per projection. The Triton kernel tiles BLOCK_M x BLOCK_N outputs,
streams K in BLOCK_K steps with `num_stages` loads in flight, and splits K over programs
(fp32 partials, summed by one torch reduction) when the output tiles alone cannot fill the
SMs. Every config of a sweep is timed; the best is checked against cuBLAS's result.

    python3 benchmarks/bench_skinny_gemm.py [--rows 16,32,64,128,192,256]

Writes $OUT/skinny_gemm.md.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LAYERS = 36
H, INTER = 2048, 11008
SHAPES = {  # name: (N, K) of Qwen2.5-3B's projections
    "qkv": (2048 + 2 * 256, H),
    "o_proj": (H, H),
    "gate_up": (2 * INTER, H),
    "down": (H, INTER),
}


@triton.jit
def _skinny_mm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    part_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_wn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PARTIAL: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """out[M, N] = x[M, K] @ w[N, K]^T, or (PARTIAL) fp32 partials over the grid's K ranges."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # K is a multiple of BLOCK_K for every shape here (checked by the caller), N of BLOCK_N.
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        a = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
        b = tl.load(w_ptrs + k0)
        acc = tl.dot(a, tl.trans(b), acc)
    out_offs = offs_m[:, None] * N + offs_n[None, :]
    if not PARTIAL:
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])
    else:
        tl.store(part_ptr + pid_k * M * N + out_offs, acc, mask=m_mask[:, None])


def skinny_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    part: torch.Tensor | None,
    cfg: tuple[int, int, int, int, int, int],
) -> torch.Tensor:
    """x @ w.T into `out` with cfg = (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, split)."""
    bm, bn, bk, stages, warps, split = cfg
    m, k = x.shape
    n = w.shape[0]
    steps = k // bk
    k_per_split = triton.cdiv(steps, split) * bk
    grid = (triton.cdiv(m, bm), n // bn, split)
    _skinny_mm_kernel[grid](
        x, w, out, part if part is not None else out, m, n, k, k_per_split,
        x.stride(0), w.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PARTIAL=split > 1, NUM_STAGES=stages,
        num_warps=warps,
    )  # fmt: skip
    if split > 1:
        out.copy_(part.sum(0))  # fp32 partials -> bf16 out
    return out


def configs(m: int, n: int, k: int, sms: int) -> list[tuple[int, int, int, int, int, int]]:
    """The sweep for one shape: tiles, pipeline depth, warps, and the split counts that
    bring the grid to about two programs per SM (and twice that)."""
    out = []
    bms = {min(128, max(16, triton.next_power_of_2(m)))}
    if m > 64:
        bms.add(64)
    for bm, bn, bk, stages in itertools.product(sorted(bms), (32, 64, 128), (64, 128), (3, 4)):
        if n % bn or k % bk:
            continue
        if stages * (bm + bn) * bk * 2 > 200 * 1024:  # shared memory
            continue
        warps = 8 if bm * bn >= 128 * 128 else 4
        tiles = triton.cdiv(m, bm) * (n // bn)
        base = 1
        while tiles * base < 2 * sms and base < 16 and k // (bk * base * 2) >= 4:
            base *= 2
        for split in sorted({base, min(2 * base, 16)}):
            if k // bk >= 2 * split:
                out.append((bm, bn, bk, stages, warps, split))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--rows", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64, 128, 192, 256]
    )
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated projections")
    args = p.parse_args(argv)

    from benchmarks.bench_gemv import graph_us
    from benchmarks.bench_text_throughput import ceilings
    from benchmarks.report import write_report

    t0 = time.perf_counter()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    ceil = ceilings()
    read_bw, mm_rate = ceil["read_GBps"] * 1e9, ceil["matmul_TFLOPs"] * 1e12
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    lines = [
        f"# Decode-batch projections: cuBLAS vs a Triton GEMM, {props.name}",
        "",
        f"Qwen2.5-3B projections, 36 distinct weights in one CUDA graph, GPU us per projection."
        f" Floor: max(bytes / {read_bw / 1e9:.0f} GB/s read, FLOPs / {mm_rate / 1e12:.0f} "
        "TFLOP/s). Triton config: BLOCK_M x BLOCK_N x BLOCK_K, stages, warps, K splits.",
        "",
        "| rows | projection | floor us | cuBLAS us | x floor | best Triton us | x floor "
        "| vs cuBLAS | config | max rel diff | configs |",
        "|---" * 11 + "|",
    ]
    totals: dict[int, list[float]] = {}
    for m in args.rows:
        for name in args.shapes.split(","):
            n, k = SHAPES[name]
            weights = [
                torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5 for _ in range(LAYERS)
            ]
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            floor = max((n * k + m * k + m * n) * 2 / read_bw, 2 * m * n * k / mm_rate) * 1e6
            cublas = graph_us([functools.partial(torch.mm, x, w.t(), out=out) for w in weights])
            ref = (x @ weights[0].t()).float()
            best = (float("inf"), None)
            cfgs = configs(m, n, k, sms)
            for cfg in cfgs:
                part = torch.empty(cfg[5], m, n, device=dev, dtype=torch.float32)
                try:
                    us = graph_us(
                        [functools.partial(skinny_mm, x, w, out, part, cfg) for w in weights]
                    )
                except Exception as exc:  # noqa: BLE001 (out of resources: skip the config)
                    print(f"  {name} M={m} {cfg}: {type(exc).__name__}", flush=True)
                    continue
                if us < best[0]:
                    best = (us, cfg)
            us, cfg = best
            diff = float("nan")
            if cfg is not None:
                part = torch.empty(cfg[5], m, n, device=dev, dtype=torch.float32)
                got = skinny_mm(x, weights[0], out, part, cfg).float()
                diff = ((got - ref).abs().max() / ref.abs().max()).item()
            totals.setdefault(m, [0.0, 0.0, 0.0])
            totals[m][0] += floor
            totals[m][1] += cublas
            totals[m][2] += min(us, cublas)
            cfg_text = (
                "x".join(map(str, cfg[:3])) + f", {cfg[3]}, {cfg[4]}w, s{cfg[5]}" if cfg else "-"
            )
            lines.append(
                f"| {m} | {name} | {floor:.1f} | {cublas:.1f} | {cublas / floor:.2f} | {us:.1f} "
                f"| {us / floor:.2f} | {100 * (us / cublas - 1):+.0f}% | {cfg_text} "
                f"| {diff:.1e} | {len(cfgs)} |"
            )
            print(
                f"[{time.perf_counter() - t0:.0f} s] M={m} {name}: floor {floor:.1f} cuBLAS "
                f"{cublas:.1f} Triton {us:.1f} {cfg} diff {diff:.1e}",
                flush=True,
            )
            del weights
            torch.cuda.empty_cache()
    lines += [
        "",
        "Per decoder layer (the four projections): floor, cuBLAS, and the better of the two "
        "per projection.",
        "",
        "| rows | floor us | cuBLAS us | best of both us | gain |",
        "|---|---|---|---|---|",
    ]
    for m, (floor, cublas, both) in totals.items():
        lines.append(
            f"| {m} | {floor:.1f} | {cublas:.1f} | {both:.1f} | {100 * (1 - both / cublas):.0f}% |"
        )
    lines.append(f"\nTotal run time {time.perf_counter() - t0:.0f} s.")
    write_report("skinny_gemm", "\n".join(lines))


if __name__ == "__main__":
    main()
