"""Batch-1 decoder layers as the engine launches them, with attention and gate_up variants.

The engine's one-token decode step runs each Qwen2.5-3B layer as five launches: the QKV
GEMV (norm, rotary, KV write), paged attention (split-KV, + its split merge), o_proj
(+ residual), gate_up (norm, SiLU-and-mul) and down (+ residual). This script builds those
launches for 36 layers of distinct random weights (6.2 GB, far beyond L2), captures one
CUDA graph per variant and times the replays in alternating rounds. No engine and no
torch.compile: a variant costs a graph capture and the kernel variants it compiles, so a
sweep takes seconds where engine A/Bs (`ab_decode_graphs.py`) take a minute a variant.

A variant `NAME:SPLITS:MERGE[:GU]` sets attention's KV split count (0: the engine's choice
for the captured graph, from `--max-seq-len`), its merge (`auto`: fused in the split launch
up to FUSED_MERGE_MAX_SPLITS, `fused`, `two`: a second launch), and optionally gate_up's
launch as `COLUMNSxWARPS` (default: `launch_config`'s, 2x4 since session 15; 1x2 before). With its fused RMSNorm each
gate_up program reads the x row twice (the rms prologue, then the K loop) plus the norm
weight: at one column a program that is ~135 MB of cached reads (L1 or L2) a layer
against 90 MB of weights, so wider programs may pay off there where they did not for the
projection alone. `sep` instead runs that norm as a launch of its own (o_proj without its
residual, then `rms_norm` with the residual add, then gate_up without a norm): one launch
more a layer, against the fused norm's ~2.8 us (session 11, gate_up alone).

    python3 benchmarks/bench_b1_layers.py [--variants engine:0:auto,s16f:16:fused]

Writes $OUT/b1_layers.md: per variant, ms per 36-layer step (median of round medians, each
round's median) and the weight-read floor at the card's measured read rate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_report  # noqa: E402

H, INTER, HQ, HK, D = 2048, 11008, 16, 2, 128  # Qwen2.5-3B
QKV = (HQ + 2 * HK) * D
LAYERS, BLOCK = 36, 16
DEFAULT_VARIANTS = (
    "engine:0:auto,s32two:32:two,s16two:16:two,gu1x2:0:auto:1x2,gu2x2:0:auto:2x2,"
    "gu2x8:0:auto:2x8,gu4x4:0:auto:4x4,gu4x8:0:auto:4x8,gusep:0:auto:sep"
)
MERGES = {"auto": None, "fused": True, "two": False}


@dataclass(frozen=True)
class Variant:
    name: str
    splits: int  # 0: the engine's choice
    merge: str  # a key of MERGES
    gate_up: tuple[int, int] | None = None  # (output columns, warps) of each gate_up program
    separate_norm: bool = False  # gate_up's RMSNorm (+ the residual add) as its own launch


def parse_variants(text: str) -> list[Variant]:
    out = []
    for item in text.split(","):
        parts = item.split(":")
        sep = len(parts) == 4 and parts[3] == "sep"
        gu = parts[3].split("x") if len(parts) == 4 and not sep else ["1", "1"]
        if (
            len(parts) not in (3, 4)
            or not parts[1].isdigit()
            or parts[2] not in MERGES
            or len(gu) != 2
            or not all(g.isdigit() and int(g) > 0 for g in gu)
        ):
            raise SystemExit(
                f"--variants: expected NAME:SPLITS:auto|fused|two[:COLUMNSxWARPS|sep], got {item!r}"
            )
        gate_up = (int(gu[0]), int(gu[1])) if len(parts) == 4 and not sep else None
        out.append(Variant(parts[0], int(parts[1]), parts[2], gate_up, sep))
    return out


def _gate_up_name(v: Variant) -> str:
    if v.separate_norm:
        return "norm apart"
    return "x".join(map(str, v.gate_up)) if v.gate_up else "default"


def build_layers(dev: torch.device, count: int = LAYERS) -> list[dict]:
    dt = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def w(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, k, device=dev, dtype=dt, generator=gen) / k**0.5

    return [
        dict(
            qkv=w(QKV, H),
            bias=torch.zeros(QKV, device=dev, dtype=dt),
            o=w(H, HQ * D),
            gate_up=w(2 * INTER, H),
            down=w(H, INTER),
            ln1=torch.ones(H, device=dev, dtype=dt),
            ln2=torch.ones(H, device=dev, dtype=dt),
        )
        for _ in range(count)
    ]


def step_calls(layers: list[dict], v: Variant, ctx: int, max_seq_len: int, dev: torch.device):
    """One decode step of one token through every layer (its residual stream passed on as
    the engine's few-token path does), as a one-call list for the graph to capture. Each
    layer has its own KV-cache blocks."""
    from mmkernels.gemv import GemvConfig, gemv, gemv_qkv_rope, launch_config
    from mmkernels.paged_attention import choose_num_kv_splits, paged_attention
    from mmkernels.rms_norm import rms_norm
    from mmkernels.rotary import build_cos_sin_cache

    dt = torch.bfloat16
    nb = -(-ctx // BLOCK)
    kc = torch.randn(len(layers) * nb + 1, BLOCK, HK, D, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    cos_sin = build_cos_sin_cache(D, max_seq_len, 1e6, device=dev)
    positions = torch.full((1,), ctx - 1, device=dev, dtype=torch.long)
    qsl = torch.tensor([0, 1], device=dev, dtype=torch.int32)
    seq_lens = torch.full((1,), ctx, device=dev, dtype=torch.int32)
    splits = v.splits or choose_num_kv_splits(
        num_q_blocks=1,
        num_kv_heads=HK,
        max_query_len=1,
        max_seq_len=max_seq_len,
        sm_count=torch.cuda.get_device_properties(dev).multi_processor_count
        if dev.type == "cuda"
        else 132,
    )
    x0 = torch.randn(1, H, device=dev, dtype=dt)
    gu_config = None
    if v.gate_up is not None:  # the row loop's K tiles as launch_config picks them
        block_k = launch_config(1, INTER, H, gated=True).block_k
        gu_config = GemvConfig(v.gate_up[0], block_k, v.gate_up[1])
    per_layer = []
    for i, layer in enumerate(layers):
        table = (torch.arange(nb, device=dev, dtype=torch.int32) + 1 + i * nb).view(1, nb)
        slots = (table[0, -1:].long() * BLOCK + (ctx - 1) % BLOCK).contiguous()
        per_layer.append((layer, table, slots))

    def step() -> torch.Tensor:
        stream = x0
        for layer, table, slots in per_layer:
            q = gemv_qkv_rope(
                stream, layer["qkv"], layer["bias"], norm_weight=layer["ln1"], eps=1e-6,
                positions=positions, cos_sin_cache=cos_sin, key_cache=kc, value_cache=vc,
                slot_mapping=slots, num_q_heads=HQ,
            )  # fmt: skip
            a = paged_attention(
                q, kc, vc, table, qsl, seq_lens, scale=D**-0.5, max_query_len=1,
                max_seq_len=max_seq_len, num_kv_splits=splits, fused_merge=MERGES[v.merge],
            ).view(1, HQ * D)  # fmt: skip
            if v.separate_norm:
                normed, s = rms_norm(gemv(a, layer["o"]), layer["ln2"], 1e-6, stream)
                act = gemv(normed, layer["gate_up"], gated=True)
            else:
                s = gemv(a, layer["o"], residual=stream)
                act = gemv(
                    s, layer["gate_up"], norm_weight=layer["ln2"], eps=1e-6, gated=True,
                    config=gu_config,
                )  # fmt: skip
            stream = gemv(act, layer["down"], residual=s)
        return stream

    return [step]


def time_graph(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, type=parse_variants)
    ap.add_argument("--ctx", type=int, default=1152, help="context length of the one sequence")
    ap.add_argument("--max-seq-len", type=int, default=1344, help="the engine's max_model_len")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=50, help="replays timed per round")
    args = ap.parse_args(argv)
    from benchmarks.bench_gemv import capture_graph
    from benchmarks.bench_text_throughput import ceilings

    t0 = time.perf_counter()
    dev = torch.device("cuda")
    read_bps = ceilings()["read_GBps"] * 1e9
    layers = build_layers(dev)
    weight_bytes = sum(t.numel() * 2 for lay in layers for k, t in lay.items() if k != "bias")
    floor_ms = weight_bytes / read_bps * 1e3
    graphs = {}
    for v in args.variants:
        graphs[v.name] = capture_graph(step_calls(layers, v, args.ctx, args.max_seq_len, dev))
        print(f"[{time.perf_counter() - t0:.0f} s] captured {v.name}", flush=True)
    rounds: dict[str, list[float]] = {v.name: [] for v in args.variants}
    for r in range(args.rounds):
        for name, graph in graphs.items():
            rounds[name].append(time_graph(graph, args.reps))
        print(f"[{time.perf_counter() - t0:.0f} s] round {r}", flush=True)
    card = torch.cuda.get_device_name(0)
    base = statistics.median(rounds[args.variants[0].name])
    lines = [
        f"# Batch-1 decoder layers, attention variants, on {card}",
        "",
        f"36 Qwen2.5-3B layers (5 launches each, context {args.ctx}), one CUDA graph per "
        f"variant. Weights {weight_bytes / 1e9:.2f} GB: floor {floor_ms:.3f} ms at "
        f"{read_bps / 1e9:.0f} GB/s.",
        "",
        "| variant | splits | merge | gate_up | ms | x floor | vs first | rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in args.variants:
        ms = statistics.median(rounds[v.name])
        lines.append(
            f"| {v.name} | {v.splits or 'engine'} | {v.merge} | "
            f"{_gate_up_name(v)} | {ms:.3f} | "
            f"{ms / floor_ms:.2f} | {100 * (ms / base - 1):+.1f}% | "
            + " ".join(f"{x:.3f}" for x in rounds[v.name])
            + " |"
        )
    write_report("b1_layers", "\n".join(lines))


if __name__ == "__main__":
    main()
