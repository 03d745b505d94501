"""Few-token projections of a decode step: `kernels/gemv.py` against cuBLAS (issue 3).

For each projection of one Qwen2.5-3B decoder layer, 36 distinct weights (one per layer, so
nothing is served from L2 as it would not be in the engine) are run back to back inside a
CUDA graph, which is how decode steps run. Reported per call: GPU microseconds and the
weight read rate as a fraction of the card's measured read rate (a sum over 1 GiB).

Variants:
  - `cublas`: F.linear alone (what the compiled layer calls today);
  - `unfused`: the ops the few-token path replaces: Triton RMSNorm (with residual add) ->
    cuBLAS -> Triton SiLU-and-mul, as the eager engine launches them;
  - `gemv`: the projection alone in the GEMV kernel;
  - `gemv fused`: the projection with its fused norm / bias / SiLU / residual.
  - `gemv fused + PDL`: the same, launched as a programmatic dependent of the call before
    (the weight fetch starts while that call finishes; the engine's default on sm_90+).
`--sweep` also times launch configs of the plain GEMV (the row loop at one row, the
tensor-core tiles at more).

    python3 benchmarks/bench_gemv.py [--rows 1,2,4,8] [--sweep]

Writes $OUT/gemv.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_text_throughput import ceilings  # noqa: E402
from kernels.activation import silu_and_mul  # noqa: E402
from kernels.gemv import GemvConfig, gemv, launch_config  # noqa: E402
from kernels.rms_norm import rms_norm  # noqa: E402

LAYERS = 36
H, INTER, QKV = 2048, 11008, 2048 + 2 * 256
# name: (N, K, norm, bias, gated, residual) of Qwen2.5-3B's projections
SHAPES = {
    "qkv (norm + bias)": (QKV, H, True, True, False, False),
    "o_proj (+ residual)": (H, H, False, False, False, True),
    "gate_up (norm, SiLU)": (INTER, H, True, False, True, False),
    "down (+ residual)": (H, INTER, False, False, False, True),
}


def graph_us(calls, reps: int = 20) -> float:
    """GPU microseconds per call of the list `calls`, replayed as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:  # warm-up: compile and autotune outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps / len(calls)


def make_case(rows: int, n: int, k: int, gated: bool, dev: torch.device):
    dt = torch.bfloat16
    n_w = 2 * n if gated else n
    weights = [torch.randn(n_w, k, device=dev, dtype=dt) / k**0.5 for _ in range(LAYERS)]
    x = torch.randn(rows, k, device=dev, dtype=dt)
    return dict(
        x=x,
        x_res=torch.randn(rows, k, device=dev, dtype=dt),
        weights=weights,
        bias=torch.randn(n_w, device=dev, dtype=dt),
        residual=torch.randn(rows, n, device=dev, dtype=dt),
        norm_w=torch.ones(k, device=dev, dtype=dt),
    )


def variants(c: dict, norm: bool, bias: bool, gated: bool, residual: bool):
    x, ws = c["x"], c["weights"]
    b = c["bias"] if bias else None
    r = c["residual"] if residual else None
    nw = c["norm_w"] if norm else None

    def unfused(w):
        h = x
        if norm:  # the engine's norm before this projection adds the previous residual
            h, _ = rms_norm(x, c["norm_w"], 1e-6, c["x_res"])
        y = F.linear(h, w, b)
        if gated:
            y = silu_and_mul(y)
        return y if r is None else r + y

    return {
        "cublas": [lambda w=w: F.linear(x, w, b) for w in ws],
        "unfused": [lambda w=w: unfused(w) for w in ws],
        "gemv": [lambda w=w: gemv(x, w, b, gated=gated, pdl=False) for w in ws],
        "gemv fused": [
            lambda w=w: gemv(x, w, b, residual=r, norm_weight=nw, gated=gated, pdl=False)
            for w in ws
        ],
        "gemv fused + PDL": [
            lambda w=w: gemv(x, w, b, residual=r, norm_weight=nw, gated=gated, pdl=True) for w in ws
        ],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,2,4,8", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--sweep", action="store_true", help="also time GEMV launch configs")
    ap.add_argument("--sweep-rows", default="1,4,8", type=lambda s: [int(v) for v in s.split(",")])
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    read_bps = ceilings()["read_GBps"] * 1e9
    card = torch.cuda.get_device_name(0)
    lines = [
        f"# Few-token projections on {card} (read rate {read_bps / 1e9:.0f} GB/s)",
        "",
        f"us per call inside a CUDA graph over {LAYERS} distinct weights (% of the read rate "
        "for the weight bytes)",
        "",
        "| projection | rows | weight MB | floor us | cublas | unfused | gemv | gemv fused "
        "| gemv fused + PDL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sweep = ["", "| projection | rows | BLOCK_N | BLOCK_K | warps | us | % read rate |"]
    sweep.append("|---|---|---|---|---|---|---|")
    for (name, (n, k, norm, bias, gated, residual)), rows in itertools.product(
        SHAPES.items(), args.rows
    ):
        c = make_case(rows, n, k, gated, dev)
        nbytes = c["weights"][0].numel() * 2
        floor_us = nbytes / read_bps * 1e6
        cells = []
        for calls in variants(c, norm, bias, gated, residual).values():
            us = graph_us(calls)
            cells.append(f"{us:.2f} ({100 * floor_us / us:.0f}%)")
        lines.append(
            f"| {name} | {rows} | {nbytes / 1e6:.1f} | {floor_us:.2f} | " + " | ".join(cells) + " |"
        )
        print(lines[-1], flush=True)
        if args.sweep and rows in args.sweep_rows:
            best = None
            if rows == 1:  # the row loop
                grid = [GemvConfig(bn, bk, w) for bn, bk, w in itertools.product(
                    [1, 2, 4], [256, 512, 1024], [1, 2, 4]) if bn * bk <= 64 * 32 * w]  # fmt: skip
            else:  # tensor-core tiles
                grid = [GemvConfig(bn, bk, 4, st, True) for bn, bk, st in itertools.product(
                    [16, 32, 64], [128, 256, 512], [3, 5]) if bn * bk <= 16384]  # fmt: skip
            for cfg in grid:
                bn, bk, warps = cfg.block_n, cfg.block_k, cfg.num_warps
                x, g = c["x"], gated
                calls = [lambda w=w, x=x, g=g, cfg=cfg: gemv(x, w, gated=g, config=cfg, pdl=False)
                         for w in c["weights"]]  # fmt: skip
                try:
                    us = graph_us(calls)
                except Exception as exc:  # e.g. out of shared memory for deep pipelines
                    sweep.append(f"| {name} | {rows} | {bn} | {bk} | {warps} x{cfg.num_stages} "
                                 f"| {type(exc).__name__} | |")  # fmt: skip
                    continue
                sweep.append(
                    f"| {name} | {rows} | {bn} | {bk} | {warps} x{cfg.num_stages} | {us:.2f} | "
                    f"{100 * floor_us / us:.0f}% |"
                )
                if best is None or us < best[0]:
                    best = (us, cfg)
            default = launch_config(rows, n, k, gated)
            sweep.append(f"| {name} | {rows} | best {best[1]} | default {default} | | "
                         f"{best[0]:.2f} | {100 * floor_us / best[0]:.0f}% |")  # fmt: skip
            print(sweep[-1], flush=True)
        del c
        torch.cuda.empty_cache()
    text = "\n".join(lines + (sweep if args.sweep else [])) + "\n"
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemv.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
