"""Benchmarks the Triton kernels of `mmkernels/` on a CUDA GPU against the card's ceilings.

Measures (a) the device-to-device copy bandwidth, the ceiling for memory-bound kernels;
(b) decode attention bandwidth (K/V bytes read + q/out) with the split-KV path on and off;
(c) causal prefill attention TFLOP/s next to SDPA's flash backend on equal unpaged shapes
(query blocks in order and longest first);
(d) rms_norm / silu_and_mul / rotary / write_kv_cache bandwidth next to their torch
references. Times are medians of `triton.testing.do_bench`, which flushes L2 between runs.
Prints a markdown table and writes it to $OUT/kernels.md when OUT is set.

    python benchmarks/bench_kernels.py            # everything, ~2 minutes on an H100
    python benchmarks/bench_kernels.py --only decode prefill
    python benchmarks/bench_kernels.py --sweep    # also try other decode/prefill tiles
"""

import argparse
import contextlib
import functools
import itertools
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SECTIONS = ("copy", "decode", "prefill", "elementwise")
BLOCK_SIZE = 16
HEAD_SIZE = 128
DTYPE = torch.bfloat16
# Decode timings replay several input sets per graph so that together they overflow L2.
L2_FLUSH_BYTES = 200 * 2**20
# (name, num_q_heads, num_kv_heads)
DECODE_MODELS = [("Qwen2.5-3B 16q/2kv", 16, 2), ("Llama-8B 32q/8kv", 32, 8)]


@dataclass
class Row:
    section: str
    name: str
    shape: str
    ms: float
    metric: str  # e.g. "2.71 TB/s"
    vs: str  # comparison against the ceiling or a baseline


def bench(fn: Callable[[], object], rep_ms: int) -> float:
    """Median milliseconds of fn, L2 flushed before every run."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=max(rep_ms // 4, 10), rep=rep_ms, return_mode="median")


def bench_graph(fns: list[Callable[[], object]], replays: int = 30) -> float:
    """Median milliseconds per call of fns, replayed as one CUDA graph.

    This is how the engine runs decode steps: no Python launch overhead in the timing. The
    fns should read different inputs, together larger than L2, since a graph replay does
    not flush the cache.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # compile and warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    return statistics.median(times)


def copy_bandwidth(rep_ms: int) -> tuple[float, Row]:
    """Bytes read + written per second by a large device-to-device copy (1 GiB each way)."""
    src = torch.randn(2**29, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    ms = bench(functools.partial(dst.copy_, src), rep_ms)
    tbps = 2 * src.numel() * src.element_size() / ms / 1e9
    return tbps, Row("copy", "torch copy_", "1 GiB → 1 GiB", ms, f"{tbps:.2f} TB/s", "ceiling")


@contextlib.contextmanager
def forced_launch_config(config: tuple[int, int, int, int]):  # noqa: ANN201
    """Within the block, paged_attention launches with this (BLOCK_M, TILE_N, num_warps,
    num_stages) whatever the batch, as the tile sweeps need."""
    import mmkernels.paged_attention as pa

    original = pa._launch_config
    pa._launch_config = lambda *_: config
    try:
        yield
    finally:
        pa._launch_config = original


def paged_decode_inputs(
    batch: int,
    context: int,
    num_q_heads: int,
    num_kv_heads: int,
    block_size: int = BLOCK_SIZE,
    layout: str = "nhd",
):
    """A decode step of `batch` sequences of `context` tokens over shuffled cache blocks.

    layout "nhd" stores the cache as the kernels' logical [blocks, block_size, kv_heads,
    head]; "hnd" stores [blocks, kv_heads, block_size, head] and passes a transposed view.
    """
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    if layout == "nhd":
        shape, view = (num_blocks, block_size, num_kv_heads, HEAD_SIZE), lambda t: t
    else:
        shape, view = (num_blocks, num_kv_heads, block_size, HEAD_SIZE), lambda t: t.transpose(1, 2)
    key_cache = view(torch.randn(shape, device="cuda", dtype=DTYPE))
    value_cache = view(torch.randn(shape, device="cuda", dtype=DTYPE))
    block_tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, -1)
    q = torch.randn(batch, num_q_heads, HEAD_SIZE, device="cuda", dtype=DTYPE)
    query_start_loc = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    seq_lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    return q, key_cache, value_cache, block_tables, query_start_loc, seq_lens


def decode_calls(
    batch: int,
    context: int,
    num_q_heads: int,
    num_kv_heads: int,
    num_kv_splits: int | None,
    block_size: int = BLOCK_SIZE,
    layout: str = "nhd",
    fused_merge: bool = True,
    copies: int | None = None,
    attention: Callable[..., torch.Tensor] | None = None,
) -> tuple[list[Callable[[], object]], int]:
    """Calls of one decode step on enough distinct input sets to overflow L2 (or `copies`
    of them), and the bytes one call must move (K/V read, q read, out written).
    `attention` replaces `mmkernels.paged_attention.paged_attention` (e.g. an older copy)."""
    from mmkernels.paged_attention import paged_attention

    attention = attention or paged_attention
    kv_bytes = 2 * batch * context * num_kv_heads * HEAD_SIZE * DTYPE.itemsize
    io_bytes = 2 * batch * num_q_heads * HEAD_SIZE * DTYPE.itemsize
    if copies is None:
        copies = min(max(2, -(-L2_FLUSH_BYTES // kv_bytes)), 16)
    calls = []
    for _ in range(copies):
        args = paged_decode_inputs(batch, context, num_q_heads, num_kv_heads, block_size, layout)
        calls.append(
            functools.partial(
                attention,
                *args,
                scale=HEAD_SIZE**-0.5,
                max_query_len=1,
                max_seq_len=context,
                out=torch.empty_like(args[0]),
                num_kv_splits=num_kv_splits,
                fused_merge=fused_merge,
            )
        )
    return calls, kv_bytes + io_bytes


def decode_rows(copy_tbps: float) -> list[Row]:
    rows = []
    for (model, hq, hkv), batch, context in itertools.product(
        DECODE_MODELS, (16, 64), (1024, 4096)
    ):
        for split_label, splits in (("auto", None), ("off", 1)):
            calls, nbytes = decode_calls(batch, context, hq, hkv, splits)
            ms = bench_graph(calls)
            tbps = nbytes / ms / 1e9
            rows.append(
                Row(
                    "decode",
                    f"paged_attention split={split_label} (graph)",
                    f"{model} B={batch} ctx={context}",
                    ms,
                    f"{tbps:.2f} TB/s",
                    f"{100 * tbps / copy_tbps:.0f}% of copy",
                )
            )
            del calls
    return rows


def prefill_rows(rep_ms: int) -> list[Row]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mmkernels.paged_attention import paged_attention

    rows = []
    for (model, hq, hkv), (batch, seq) in itertools.product(
        DECODE_MODELS[1:], ((8, 1024), (2, 4096))
    ):
        num_tokens = batch * seq
        blocks = num_tokens // BLOCK_SIZE
        key_cache = torch.randn(blocks, BLOCK_SIZE, hkv, HEAD_SIZE, device="cuda", dtype=DTYPE)
        value_cache = torch.randn_like(key_cache)
        q = torch.randn(num_tokens, hq, HEAD_SIZE, device="cuda", dtype=DTYPE)
        block_tables = torch.arange(blocks, device="cuda", dtype=torch.int32).view(batch, -1)
        query_start_loc = torch.arange(0, num_tokens + 1, seq, device="cuda", dtype=torch.int32)
        seq_lens = torch.full((batch,), seq, device="cuda", dtype=torch.int32)
        out = torch.empty_like(q)
        fn = functools.partial(
            paged_attention,
            q,
            key_cache,
            value_cache,
            block_tables,
            query_start_loc,
            seq_lens,
            scale=HEAD_SIZE**-0.5,
            max_query_len=seq,
            max_seq_len=seq,
            out=out,
        )
        # Same numbers unpaged for SDPA; K/V expanded to all query heads (equal FLOPs).
        group = hq // hkv
        q_sdpa = q.view(batch, seq, hq, HEAD_SIZE).transpose(1, 2)
        k_sdpa = key_cache.view(batch, seq, hkv, HEAD_SIZE).transpose(1, 2)
        v_sdpa = value_cache.view(batch, seq, hkv, HEAD_SIZE).transpose(1, 2)
        k_sdpa = k_sdpa.repeat_interleave(group, dim=1).contiguous()
        v_sdpa = v_sdpa.repeat_interleave(group, dim=1).contiguous()
        q_sdpa = q_sdpa.contiguous()

        def sdpa(q_sdpa=q_sdpa, k_sdpa=k_sdpa, v_sdpa=v_sdpa):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(
                    q_sdpa, k_sdpa, v_sdpa, is_causal=True
                )

        flops = 2 * 2 * batch * hq * seq * seq * HEAD_SIZE / 2  # QK^T and PV, causal half
        ms_sdpa = bench(sdpa, rep_ms)
        tflops_sdpa = flops / ms_sdpa / 1e9
        shape = f"{model} B={batch} S={seq}"
        for name, order in (("", False), (", longest first", True)):
            ms_ours = bench(functools.partial(fn, longest_first=order), rep_ms)
            tflops = flops / ms_ours / 1e9
            rows.append(
                Row(
                    "prefill",
                    f"paged_attention causal{name}",
                    shape,
                    ms_ours,
                    f"{tflops:.0f} TFLOP/s",
                    f"{100 * tflops / tflops_sdpa:.0f}% of SDPA flash",
                )
            )
        rows.append(
            Row("prefill", "SDPA flash is_causal", shape, ms_sdpa, f"{tflops_sdpa:.0f} TFLOP/s", "")
        )
    return rows


def elementwise_rows(copy_tbps: float, rep_ms: int) -> list[Row]:
    from mmkernels.activation import silu_and_mul, silu_and_mul_torch
    from mmkernels.kv_cache import write_kv_cache, write_kv_cache_torch
    from mmkernels.rms_norm import rms_norm, rms_norm_torch
    from mmkernels.rotary import apply_rotary, apply_rotary_torch, build_cos_sin_cache

    tokens, hidden, inter = 4096, 4096, 14336
    item = DTYPE.itemsize
    x = torch.randn(tokens, hidden, device="cuda", dtype=DTYPE)
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, device="cuda", dtype=DTYPE)
    gate_up = torch.randn(tokens, 2 * inter, device="cuda", dtype=DTYPE)
    q = torch.randn(tokens, 32, HEAD_SIZE, device="cuda", dtype=DTYPE)
    k = torch.randn(tokens, 8, HEAD_SIZE, device="cuda", dtype=DTYPE)
    cache = build_cos_sin_cache(HEAD_SIZE, 32768, 500000.0).cuda()
    positions = torch.randint(0, 32768, (tokens,), device="cuda")
    mpositions = torch.randint(0, 32768, (3, tokens), device="cuda")
    key_cache = torch.empty(
        tokens // BLOCK_SIZE * 2, BLOCK_SIZE, 8, HEAD_SIZE, device="cuda", dtype=DTYPE
    )
    value_cache = torch.empty_like(key_cache)
    slots = torch.randperm(key_cache.shape[0] * BLOCK_SIZE, device="cuda")[:tokens]
    qk_bytes = 2 * (q.numel() + k.numel()) * item + tokens * HEAD_SIZE * 4
    cases = [
        (
            "rms_norm + residual",
            f"{tokens}×{hidden}",
            4 * x.numel() * item,  # read x and residual, write out and new residual
            lambda: rms_norm(x, weight, 1e-6, residual),
            lambda: rms_norm_torch(x, weight, 1e-6, residual),
        ),
        (
            "silu_and_mul",
            f"{tokens}×2·{inter}",
            3 * tokens * inter * item,
            lambda: silu_and_mul(gate_up),
            lambda: silu_and_mul_torch(gate_up),
        ),
        (
            "rotary 1-D (in place)",
            f"{tokens} tok 32q/8k×{HEAD_SIZE}",
            qk_bytes,
            lambda: apply_rotary(q, k, positions, cache),
            lambda: apply_rotary_torch(q, k, positions, cache),
        ),
        (
            "rotary M-RoPE (in place)",
            f"{tokens} tok 32q/8k×{HEAD_SIZE}",
            qk_bytes,
            lambda: apply_rotary(q, k, mpositions, cache, mrope_section=[16, 24, 24]),
            lambda: apply_rotary_torch(q, k, mpositions, cache, mrope_section=[16, 24, 24]),
        ),
        (
            "write_kv_cache",
            f"{tokens} tok 8kv×{HEAD_SIZE}",
            4 * k.numel() * item,
            lambda: write_kv_cache(k, k, key_cache, value_cache, slots),
            lambda: write_kv_cache_torch(k, k, key_cache, value_cache, slots),
        ),
    ]
    rows = []
    for name, shape, nbytes, fn, ref in cases:
        ms, ms_ref = bench(fn, rep_ms), bench(ref, rep_ms)
        tbps = nbytes / ms / 1e9
        rows.append(
            Row(
                "elementwise",
                name,
                shape,
                ms,
                f"{tbps:.2f} TB/s",
                f"{100 * tbps / copy_tbps:.0f}% of copy; torch {ms_ref * 1e3:.0f} µs",
            )
        )
    return rows


def sweep_rows(rep_ms: int) -> list[Row]:
    """Times other tiles (BLOCK_M, TILE_N, num_warps, num_stages) and split counts."""
    import mmkernels.paged_attention as pa

    rows = []

    def timed(label: str, config: tuple[int, int, int, int], run: Callable[[], float]) -> None:
        try:
            with forced_launch_config(config):
                ms = run()
        except Exception as exc:  # e.g. out of shared memory
            rows.append(Row("sweep", label, str(config), float("nan"), type(exc).__name__, ""))
        else:
            rows.append(Row("sweep", label, str(config), ms, "", ""))

    decode_configs = [
        (16, 32, 4, 2),
        (16, 32, 4, 4),
        (16, 64, 4, 2),
        (16, 64, 2, 2),
        (16, 128, 4, 2),
    ]
    decode_shapes = [(16, 1024, 16, 2), (16, 4096, 16, 2), (16, 4096, 32, 8), (64, 1024, 32, 8)]
    for (batch, context, hq, hkv), splits in itertools.product(decode_shapes, (1, 4, 8, 16, 32)):
        for config in decode_configs:
            calls, _ = decode_calls(batch, context, hq, hkv, splits)
            label = f"decode {hq}q/{hkv}kv B={batch} ctx={context} splits={splits}"
            timed(label, config, functools.partial(bench_graph, calls, 10))
            del calls
    prefill_configs = [
        (64, 64, 4, 3),
        (64, 64, 4, 2),
        (64, 32, 4, 2),
        (64, 128, 4, 2),
        (128, 64, 4, 3),
        (128, 64, 8, 3),
        (128, 128, 8, 3),
    ]
    for batch, seq in ((1, 4096), (8, 1024)):
        blocks = batch * seq // BLOCK_SIZE
        args = (
            torch.randn(batch * seq, 32, HEAD_SIZE, device="cuda", dtype=DTYPE),
            torch.randn(blocks, BLOCK_SIZE, 8, HEAD_SIZE, device="cuda", dtype=DTYPE),
            torch.randn(blocks, BLOCK_SIZE, 8, HEAD_SIZE, device="cuda", dtype=DTYPE),
            torch.arange(blocks, device="cuda", dtype=torch.int32).view(batch, -1),
            torch.arange(0, batch * seq + 1, seq, device="cuda", dtype=torch.int32),
            torch.full((batch,), seq, device="cuda", dtype=torch.int32),
        )
        fn = functools.partial(
            pa.paged_attention,
            *args,
            scale=HEAD_SIZE**-0.5,
            max_query_len=seq,
            max_seq_len=seq,
        )
        for config in prefill_configs:
            timed(
                f"prefill 32q/8kv B={batch} S={seq}",
                config,
                functools.partial(bench, fn, rep_ms),
            )
    return rows


def render(rows: list[Row], header: str) -> str:
    lines = [
        header,
        "",
        "| section | kernel | shape | median µs | achieved | vs |",
        "|---|---|---|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.section} | {r.name} | {r.shape} | {r.ms * 1e3:.1f} | {r.metric} | {r.vs} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time")
    parser.add_argument("--sweep", action="store_true", help="also sweep attention tiles")
    parser.add_argument(
        "--out", type=Path, default=None, help="markdown output (default: $OUT/kernels.md)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    import triton

    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    header = (
        f"# Kernel benchmarks: {props.name}, {props.multi_processor_count} SMs, "
        f"torch {torch.__version__}, triton {triton.__version__}, {DTYPE}"
    )
    copy_tbps, copy_row = copy_bandwidth(args.rep_ms)
    rows = [copy_row]
    print(render(rows, header), flush=True)
    if "decode" in args.only:
        rows += decode_rows(copy_tbps)
    if "prefill" in args.only:
        rows += prefill_rows(args.rep_ms)
    if "elementwise" in args.only:
        rows += elementwise_rows(copy_tbps, args.rep_ms)
    if args.sweep:
        rows += sweep_rows(args.rep_ms)
    table = render(rows, header)
    print(table)
    out = args.out or (Path(os.environ["OUT"]) / "kernels.md" if os.environ.get("OUT") else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)


if __name__ == "__main__":
    main()
