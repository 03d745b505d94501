"""Batch-1 decoder layers as the engine launches them, with attention and gate_up variants.

The engine's one-token decode step runs each Qwen2.5-3B layer as five launches: the QKV
GEMV (norm, rotary, KV write), paged attention (split-KV, + its split merge), o_proj
(+ residual), gate_up (norm, SiLU-and-mul) and down (+ residual). This script builds those
launches for 36 layers of distinct random weights (6.2 GB, far beyond L2), captures one
CUDA graph per variant and times the replays in alternating rounds. No engine and no
torch.compile: a variant costs a graph capture and the kernel variants it compiles, so a
sweep takes seconds where engine A/Bs (`ab_decode_graphs.py`) take a minute a variant.

A variant is `NAME[:KEY=VALUE]...`:

- `splits=N`: attention's KV split count (default 0: the engine's choice for the captured
  graph, from `--max-seq-len`); `merge=auto|fused|two`: its merge (`auto`, the default:
  fused in the split launch up to FUSED_MERGE_MAX_SPLITS; `two`: a second launch);
- `qkv=`, `o=`, `gu=`, `down=`: a projection's row-loop launch as `COLUMNSxWARPS` (K tiles
  as `launch_config` picks them) or `COLUMNSxBLOCK_KxWARPS` (default: `launch_config`'s).
  A K tile as wide as the row (2048 for qkv, o_proj, gate_up) makes the one tile a
  program fetches before its PDL wait its whole slice of the weight. `gu=sep` instead
  runs gate_up's RMSNorm as a launch of its own (o_proj without its residual, then
  `rms_norm` with the residual add, then gate_up without a norm); `onorm=1` has o_proj's
  last program write that norm (`gemv_norm_out`) and gate_up read it, with no norm of
  its own; `mlp=flow` runs o_proj, gate_up and down as one `mmkernels/mlp_flow.py`
  launch of tasks that wait only for what they read (`flownt`: task numbers from the
  program id, not an atomic ticket);
- `trig=KIND.PLACE+...`: where launches let their PDL successor launch
  (`mmkernels/_dispatch.pdl_trigger`; kinds rope, plain, gated, attn; places early =
  before its own wait, so e.g. gate_up launches and fetches weights while attention still
  runs under o_proj's wait; start; late = after the main loop).

    python3 benchmarks/bench_b1_layers.py [--variants engine,early:trig=plain.early+gated.early]

Writes $OUT/b1_layers.md: per variant, ms per 36-layer step (median of round medians, each
round's median) and the weight-read floor at the card's measured read rate.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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
WHOLE = "o=2x2048x4:qkv=1x2048x4:gu=2x2048x4"  # each program's whole slice in one K tile
DEFAULT_VARIANTS = (
    "engine,oearly:trig=plain.early,gearly:trig=gated.early,"
    "gemvearly:trig=plain.early+gated.early,aearly:trig=attn.early,"
    "allearly:trig=plain.early+gated.early+attn.early,gu1tile:gu=2x2048x4,whole:" + WHOLE + ","
    "wholeearly:" + WHOLE + ":trig=plain.early+gated.early,"
    "wholeallearly:" + WHOLE + ":trig=plain.early+gated.early+attn.early,"
    "onorm:onorm=1,onormearly:onorm=1:trig=plain.early+gated.early,"
    "onormgu2x4:onorm=1:gu=2x4,onormwhole:onorm=1:" + WHOLE + ":trig=plain.early+gated.early,"
    "ropestart:trig=plain.early+gated.early+attn.early+rope.start,"
    "ropeearly:trig=plain.early+gated.early+attn.early+rope.early,"
    "down1x2048:down=1x2048x1:trig=plain.early+gated.early,"
    "down2x2:down=2x1024x2:trig=plain.early+gated.early,"
    "s16early:splits=16:trig=plain.early+gated.early+attn.early,"
    "s8early:splits=8:trig=plain.early+gated.early+attn.early,"
    "flow:mlp=flow,flownt:mlp=flownt,flowearly:mlp=flow:trig=attn.early"
)
MERGES = {"auto": None, "fused": True, "two": False}


@dataclass(frozen=True)
class Variant:
    name: str
    splits: int = 0  # 0: the engine's choice
    merge: str = "auto"  # a key of MERGES
    configs: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (projection, launch) overrides
    separate_norm: bool = False  # gate_up's RMSNorm (+ the residual add) as its own launch
    trigger: str = ""  # MMENGINE_PDL_TRIGGER while this variant launches ("": defaults)
    norm_out: bool = False  # o_proj's last program writes gate_up's normalized input
    mlp: str = ""  # "flow" / "flownt": o_proj, gate_up and down as one mlp_flow launch

    def config(self, projection: str, rows: int, n: int, k: int, **kw: bool):  # noqa: ANN201
        """The projection's GemvConfig: this variant's override, else None (the default)."""
        from mmkernels.gemv import GemvConfig, launch_config

        launch = dict(self.configs).get(projection)
        if launch is None:
            return None
        if len(launch) == 2:  # COLUMNSxWARPS: the K tile as launch_config picks it
            launch = (launch[0], launch_config(rows, n, k, **kw).block_k, launch[1])
        return GemvConfig(*launch)


PROJECTIONS = ("qkv", "o", "gu", "down")


def parse_variants(text: str) -> list[Variant]:
    out = []
    for item in text.split(","):
        name, *fields = item.split(":")
        kw: dict = {}
        configs = []
        for field in fields:
            key, _, value = field.partition("=")
            nums = value.split("x")
            if key == "splits" and value.isdigit():
                kw["splits"] = int(value)
            elif key == "merge" and value in MERGES:
                kw["merge"] = value
            elif key == "gu" and value == "sep":
                kw["separate_norm"] = True
            elif key == "onorm" and value in ("0", "1"):
                kw["norm_out"] = value == "1"
            elif key == "mlp" and value in ("flow", "flownt"):
                kw["mlp"] = value
            elif (
                key in PROJECTIONS
                and len(nums) in (2, 3)
                and all(x.isdigit() and int(x) > 0 for x in nums)
            ):
                configs.append((key, tuple(int(x) for x in nums)))
            elif key == "trig" and value:
                kw["trigger"] = ",".join(t.replace(".", "=") for t in value.split("+"))
            else:
                raise SystemExit(
                    f"--variants: expected NAME[:KEY=VALUE]... with splits=N, "
                    f"merge=auto|fused|two, qkv|o|gu|down=CxW or CxKxW, gu=sep, onorm=0|1, "
                    f"mlp=flow|flownt, "
                    f"trig=KIND.PLACE+...; got {field!r} in {item!r}"
                )
        if not name:
            raise SystemExit(f"--variants: a variant needs a name, got {item!r}")
        if kw.get("separate_norm") and kw.get("norm_out"):
            raise SystemExit(f"--variants: gu=sep and onorm=1 both move the norm, in {item!r}")
        if kw.get("trigger"):
            _check_trigger(kw["trigger"])
        out.append(Variant(name, configs=tuple(configs), **kw))
    return out


def _check_trigger(spec: str) -> None:
    from mmkernels import _dispatch

    with _trigger_env(spec):
        try:
            _dispatch.pdl_trigger("plain")
        except ValueError as e:
            raise SystemExit(f"--variants: {e}") from None


@contextlib.contextmanager
def _trigger_env(spec: str):  # noqa: ANN202
    from mmkernels._dispatch import PDL_TRIGGER_ENV

    old = os.environ.get(PDL_TRIGGER_ENV)
    os.environ[PDL_TRIGGER_ENV] = spec
    try:
        yield
    finally:
        if old is None:
            del os.environ[PDL_TRIGGER_ENV]
        else:
            os.environ[PDL_TRIGGER_ENV] = old


def _launches(v: Variant) -> str:
    parts = [f"{k}={'x'.join(map(str, c))}" for k, c in v.configs]
    if v.separate_norm:
        parts.append("gate_up norm apart")
    if v.norm_out:
        parts.append("norm by o_proj")
    if v.mlp:
        parts.append(f"MLP half as one launch ({v.mlp})")
    return " ".join(parts) or "default"


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
    from mmkernels.gemv import NormOut, gemv, gemv_norm_out, gemv_qkv_rope
    from mmkernels.mlp_flow import MlpFlowConfig, mlp_flow, mlp_flow_counters
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
    qkv_cfg = v.config("qkv", 1, QKV // 2, H, rope=True)
    o_cfg = v.config("o", 1, H, HQ * D)
    gu_cfg = v.config("gu", 1, INTER, H, gated=True, norm=not (v.separate_norm or v.norm_out))
    down_cfg = v.config("down", 1, H, INTER)
    flow_cfg = MlpFlowConfig(ticket=v.mlp == "flow")
    per_layer = []
    for i, layer in enumerate(layers):
        table = (torch.arange(nb, device=dev, dtype=torch.int32) + 1 + i * nb).view(1, nb)
        slots = (table[0, -1:].long() * BLOCK + (ctx - 1) % BLOCK).contiguous()
        counter = torch.zeros(1, device=dev, dtype=torch.int32)
        flow = mlp_flow_counters(H, INTER, dev, flow_cfg) if v.mlp else None
        per_layer.append((layer, table, slots, NormOut(layer["ln2"], 1e-6, counter), flow))

    def step() -> torch.Tensor:
        with _trigger_env(v.trigger):  # the trigger places are constexprs, set per launch
            return layers_step()

    def layers_step() -> torch.Tensor:
        stream = x0
        for layer, table, slots, norm_out, flow_counters in per_layer:
            q = gemv_qkv_rope(
                stream, layer["qkv"], layer["bias"], norm_weight=layer["ln1"], eps=1e-6,
                positions=positions, cos_sin_cache=cos_sin, key_cache=kc, value_cache=vc,
                slot_mapping=slots, num_q_heads=HQ, config=qkv_cfg,
            )  # fmt: skip
            a = paged_attention(
                q, kc, vc, table, qsl, seq_lens, scale=D**-0.5, max_query_len=1,
                max_seq_len=max_seq_len, num_kv_splits=splits, fused_merge=MERGES[v.merge],
            ).view(1, HQ * D)  # fmt: skip
            if v.mlp:
                stream = mlp_flow(
                    a, layer["o"], stream, layer["ln2"], 1e-6, layer["gate_up"], layer["down"],
                    flow_counters, flow_cfg,
                )  # fmt: skip
                continue
            if v.norm_out:
                s, normed = gemv_norm_out(
                    a, layer["o"], residual=stream, norm_out=norm_out, config=o_cfg
                )
                act = gemv(normed, layer["gate_up"], gated=True, config=gu_cfg)
            elif v.separate_norm:
                o = gemv(a, layer["o"], config=o_cfg)
                normed, s = rms_norm(o, layer["ln2"], 1e-6, stream)
                act = gemv(normed, layer["gate_up"], gated=True, config=gu_cfg)
            else:
                s = gemv(a, layer["o"], residual=stream, config=o_cfg)
                act = gemv(
                    s, layer["gate_up"], norm_weight=layer["ln2"], eps=1e-6, gated=True,
                    config=gu_cfg,
                )  # fmt: skip
            stream = gemv(act, layer["down"], residual=s, config=down_cfg)
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
        "| variant | splits | merge | launches | PDL triggers | ms | x floor | vs first | rounds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in args.variants:
        ms = statistics.median(rounds[v.name])
        lines.append(
            f"| {v.name} | {v.splits or 'engine'} | {v.merge} | "
            f"{_launches(v)} | {v.trigger or 'default'} | {ms:.3f} | "
            f"{ms / floor_ms:.2f} | {100 * (ms / base - 1):+.1f}% | "
            + " ".join(f"{x:.3f}" for x in rounds[v.name])
            + " |"
        )
    write_report("b1_layers", "\n".join(lines))


if __name__ == "__main__":
    main()
