"""Few-token projections of a decode step: `mmkernels/gemv.py` against cuBLAS (issue 3).

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
tensor-core tiles at more); with `--fused-sweep` each config runs with the projection's
fusions and PDL, as the engine launches it. `--rope` times the QKV projection with rotary and the KV-cache
write in its epilogue (`gemv_qkv_rope`) against the fused-norm GEMV followed by the
`rotary_write_kv` kernel (the two launches it replaces), both with PDL, plus its launch
configs.

    python3 benchmarks/bench_gemv.py [--rows 1,2,4,8] [--sweep] [--rope] [--lm-head]

Writes $OUT/gemv.md.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_text_throughput import ceilings  # noqa: E402
from benchmarks.report import write_report  # noqa: E402
from mmkernels.activation import silu_and_mul  # noqa: E402
from mmkernels.gemv import GemvConfig, gemv, gemv_qkv_rope, launch_config  # noqa: E402
from mmkernels.rms_norm import rms_norm  # noqa: E402
from mmkernels.rotary import build_cos_sin_cache  # noqa: E402
from mmkernels.rotary_kv import rotary_write_kv  # noqa: E402

LAYERS = 36
H, INTER, QKV = 2048, 11008, 2048 + 2 * 256
HQ, HK, D = 16, 2, 128  # Qwen2.5-3B attention heads
# name: (N, K, norm, bias, gated, residual) of Qwen2.5-3B's projections
LM_HEAD, VOCAB = "lm_head", 151936  # Qwen2.5's vocabulary (`--lm-head`)
SHAPES = {
    "qkv (norm + bias)": (QKV, H, True, True, False, False),
    "o_proj (+ residual)": (H, H, False, False, False, True),
    "gate_up (norm, SiLU)": (INTER, H, True, False, True, False),
    "down (+ residual)": (H, INTER, False, False, False, True),
}


def capture_graph(calls) -> torch.cuda.CUDAGraph:  # noqa: ANN001
    """The list `calls` (zero-argument callables) captured as one CUDA graph, after one
    eager run on a side stream (compiles and autotunes outside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    return graph


def graph_us(calls, reps: int = 20) -> float:
    """GPU microseconds per call of the list `calls`, replayed as one CUDA graph."""
    graph = capture_graph(calls)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps / len(calls)


def make_case(rows: int, n: int, k: int, gated: bool, dev: torch.device, copies: int = LAYERS):
    dt = torch.bfloat16
    n_w = 2 * n if gated else n
    weights = [torch.randn(n_w, k, device=dev, dtype=dt) / k**0.5 for _ in range(copies)]
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


def rope_rows(rows: int, configs: bool, floor_us_of) -> list[str]:  # noqa: ANN001
    """The QKV projection + rotary + KV write: two launches (fused-norm GEMV, then
    `rotary_write_kv`) vs one (`gemv_qkv_rope`), and with `configs` its launch configs."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    c = make_case(rows, QKV, H, False, dev)
    cos_sin = build_cos_sin_cache(D, 4096, 1e6, device=dev)
    positions = torch.randint(0, 4096, (rows,), device=dev)
    kc = torch.zeros(64, 16, HK, D, device=dev, dtype=dt)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(64 * 16, device=dev)[:rows]
    x, b, nw = c["x"], c["bias"], c["norm_w"]

    def two(w):  # noqa: ANN001, ANN202
        qkv = gemv(x, w, b, norm_weight=nw, pdl=True)
        q, k, v = qkv.split([HQ * D, HK * D, HK * D], -1)
        views = (q.view(rows, HQ, D), k.view(rows, HK, D), v.view(rows, HK, D))
        return rotary_write_kv(*views, positions, cos_sin, kc, vc, slots)

    def one(w, cfg=None, pdl=True):  # noqa: ANN001, ANN202
        return gemv_qkv_rope(
            x, w, b, norm_weight=nw, eps=1e-6, positions=positions, cos_sin_cache=cos_sin,
            key_cache=kc, value_cache=vc, slot_mapping=slots, num_q_heads=HQ, config=cfg, pdl=pdl,
        )  # fmt: skip

    floor_us = floor_us_of(c["weights"][0])
    out = []
    for name, fn in (("gemv (norm, bias) + rotary_write_kv", two), ("gemv_qkv_rope", one)):
        us = graph_us([lambda w=w, fn=fn: fn(w) for w in c["weights"]])
        out.append(f"| {name} | {rows} | default | {us:.2f} | {100 * floor_us / us:.0f}% |")
        print(out[-1], flush=True)
    if configs:
        if rows == 1:
            grid = [GemvConfig(bn, bk, w) for bn, bk, w in itertools.product(
                [1, 2], [512, 1024], [2, 4, 8]) if bn * bk <= 64 * 32 * w]  # fmt: skip
        else:
            grid = [GemvConfig(bn, bk, 4, st, True) for bn, bk, st in itertools.product(
                [16, 32], [128, 256, 512], [2, 3]) if bn * bk <= 8192]  # fmt: skip
        for cfg in grid:
            try:
                us = graph_us([lambda w=w, cfg=cfg: one(w, cfg) for w in c["weights"]])
            except Exception as exc:  # e.g. out of shared memory
                out.append(f"| gemv_qkv_rope | {rows} | {tuple(cfg)} | {type(exc).__name__} | |")
                continue
            out.append(f"| gemv_qkv_rope | {rows} | {tuple(cfg)} | {us:.2f} | "
                       f"{100 * floor_us / us:.0f}% |")  # fmt: skip
            print(out[-1], flush=True)
    return out


def fused_calls(c: dict, bias: bool, residual: bool, gated: bool, cfg: GemvConfig, pdl: bool):
    """The fused projection (norm, bias, residual, SiLU as the shape has them) at `cfg`."""
    x, nw = c["x"], c["norm_w"]
    b = c["bias"] if bias else None
    r = c["residual"] if residual else None
    return [
        lambda w=w: gemv(x, w, b, residual=r, norm_weight=nw, gated=gated, config=cfg, pdl=pdl)
        for w in c["weights"]
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,2,4,8", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--sweep", action="store_true", help="also time GEMV launch configs")
    ap.add_argument("--sweep-rows", default="1,4,8", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument(
        "--norm-widths",
        default="",
        type=lambda s: [int(v) for v in s.split(",") if v],
        help="tensor-core rows (> 1): also time the fused RMSNorm's prologue at these K widths "
        "(0 = the weight tile's BLOCK_K, the session-10 kernel), with and without PDL",
    )
    ap.add_argument(
        "--fused-sweep",
        action="store_true",
        help="--sweep times each config with the projection's fusions (norm, bias, residual, "
        "SiLU) and PDL, as the engine runs it, instead of the projection alone",
    )
    ap.add_argument(
        "--lm-head",
        action="store_true",
        help="also time the LM head (151936 x 2048, 4 distinct weights: one is 622 MB, far "
        "beyond L2): today cuBLAS after the graph",
    )
    ap.add_argument(
        "--rope",
        action="store_true",
        help="also time the QKV projection with rotary + KV write fused (gemv_qkv_rope)",
    )
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    read_bps = ceilings()["read_GBps"] * 1e9
    card = torch.cuda.get_device_name(0)
    lines = [
        f"# Few-token projections on {card} (read rate {read_bps / 1e9:.0f} GB/s)",
        "",
        f"us per call inside a CUDA graph over {LAYERS} distinct weights (4 for the LM head; % of "
        "the read rate for the weight bytes)",
        "",
        "| projection | rows | weight MB | floor us | cublas | unfused | gemv | gemv fused "
        "| gemv fused + PDL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    what = "fused + PDL, as in the engine" if args.fused_sweep else "the projection alone"
    sweep = ["", f"Launch configs ({what})", ""]
    sweep += ["| projection | rows | BLOCK_N | BLOCK_K | warps | us | % read rate |"]
    sweep.append("|---|---|---|---|---|---|---|")
    norm_rows = ["", "Fused RMSNorm prologue width (tensor-core tiles at their defaults)", ""]
    norm_rows += ["| projection | rows | prologue K | launch | us | % read rate |"]
    norm_rows.append("|---|---|---|---|---|---|")
    shapes = dict(
        SHAPES, **({LM_HEAD: (VOCAB, H, False, False, False, False)} if args.lm_head else {})
    )
    for (name, (n, k, norm, bias, gated, residual)), rows in itertools.product(
        shapes.items(), args.rows
    ):
        c = make_case(rows, n, k, gated, dev, 4 if name == LM_HEAD else LAYERS)
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
        if norm and rows > 1 and args.norm_widths:
            default = launch_config(rows, n, k, gated)
            for width, pdl in itertools.product(args.norm_widths, (False, True)):
                cfg = default._replace(norm_block_k=width)
                calls = fused_calls(c, bias, residual, gated, cfg, pdl)
                us = graph_us(calls)
                norm_rows.append(
                    f"| {name} | {rows} | {width or default.block_k} | {'PDL' if pdl else '-'} | "
                    f"{us:.2f} | {100 * floor_us / us:.0f}% |"
                )
                print(norm_rows[-1], flush=True)
        if args.sweep and rows in args.sweep_rows:
            best = None
            if rows == 1:  # the row loop
                grid = [GemvConfig(bn, bk, w) for bn, bk, w in itertools.product(
                    [1, 2, 4, 8], [256, 512, 1024], [1, 2, 4]) if bn * bk <= 64 * 32 * w]  # fmt: skip
            else:  # tensor-core tiles
                grid = [GemvConfig(bn, bk, 4, st, True) for bn, bk, st in itertools.product(
                    [16, 32, 64], [128, 256, 512], [3, 5]) if bn * bk <= 16384]  # fmt: skip
            for cfg in grid:
                bn, bk, warps = cfg.block_n, cfg.block_k, cfg.num_warps
                x, g = c["x"], gated
                if args.fused_sweep:  # as the engine launches it: its fusions, PDL
                    calls = fused_calls(c, bias, residual, gated, cfg, True)
                else:
                    calls = [lambda w=w, x=x, g=g, cfg=cfg: gemv(x, w, gated=g, config=cfg,
                             pdl=False) for w in c["weights"]]  # fmt: skip
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
    rope = ["", "QKV projection + rotary + KV-cache write, PDL launches", ""]
    rope += ["| kernels | rows | launch | us | % read rate |", "|---|---|---|---|---|"]
    for rows in args.rows if args.rope else []:
        rope += rope_rows(rows, args.sweep, lambda w: w.numel() * 2 / read_bps * 1e6)
    parts = lines + (norm_rows if args.norm_widths else []) + (sweep if args.sweep else [])
    write_report("gemv", "\n".join(parts + (rope if args.rope else [])))


if __name__ == "__main__":
    main()
