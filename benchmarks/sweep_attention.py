"""Paged attention: this tree's kernel against a saved earlier version, over tiles and splits.

Two parts, one markdown report ($OUT/sweep_attention.md):

- prefill: causal attention of fresh prompts (8 x 1024 and 2 x 4096 tokens, Llama-8B
  heads 32q/8kv; 8 x 1024 with Qwen2.5-3B heads 16q/2kv) for several (BLOCK_M, TILE_N,
  warps, stages) tiles, next to SDPA's flash backend on the same unpaged numbers
  (`triton.testing.do_bench` medians, L2 flushed);
- decode: one-token steps of Qwen2.5-3B heads at batch 1, 16 and 64 over shuffled cache
  blocks, for split counts up to 64 with the fused (in-launch) and the two-launch merge,
  timed as CUDA-graph replays over distinct inputs (36 at batch 1: one per layer), next to
  a device copy of the same bytes.

`--baseline FILE` loads another copy of `mmkernels/paged_attention.py` (e.g. the previous
commit's, `git show HEAD~1:mmkernels/paged_attention.py > /tmp/old.py`) and times it at the
default tiles beside this tree's, so a kernel change is measured against its predecessor
in one run on one card.

    python3 benchmarks/sweep_attention.py [--baseline /tmp/old.py] [--only prefill decode]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import itertools
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_kernels import (  # noqa: E402
    BLOCK_SIZE,
    DTYPE,
    HEAD_SIZE,
    bench,
    bench_graph,
    copy_bandwidth,
    decode_calls,
)
from benchmarks.report import write_report  # noqa: E402
from benchmarks.sweep_decode_splits import same_size_copy_tbps  # noqa: E402

PREFILL_SHAPES = [(32, 8, 8, 1024), (32, 8, 2, 4096), (16, 2, 8, 1024)]  # hq, hkv, B, S
PREFILL_TILES = [
    (256, 64, 8, 2),
    (256, 64, 8, 3),
    (256, 128, 8, 2),
    (256, 64, 16, 2),
    (256, 32, 8, 3),
    (128, 128, 8, 3),
    (128, 64, 8, 3),
    (64, 64, 4, 3),
]
DECODE_SHAPES = [(1, 1152), (16, 1152), (16, 4096), (64, 1152)]  # B, ctx; 16q/2kv
DECODE_TILES = [(16, 64, 4, 2), (16, 32, 4, 2), (16, 32, 2, 2)]
DECODE_SPLITS = [4, 8, 16, 32, 64]


def load_module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("paged_attention_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def tile(module: ModuleType, config: tuple[int, int, int, int] | None):  # noqa: ANN201
    """Within the block, `module.paged_attention` launches with this tile (None: its own)."""
    original = module._launch_config
    if config is not None:
        module._launch_config = lambda *_: config
    try:
        yield
    finally:
        module._launch_config = original


def prefill_part(modules: dict[str, ModuleType], rep_ms: int) -> list[str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lines = [
        "## Prefill (causal, fresh prompts), TFLOP/s and % of SDPA flash",
        "",
        "| heads | B x S | kernel | tile | us | TFLOP/s | % of flash |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for hq, hkv, batch, seq in PREFILL_SHAPES:
        n = batch * seq
        blocks = n // BLOCK_SIZE
        kc = torch.randn(blocks, BLOCK_SIZE, hkv, HEAD_SIZE, device="cuda", dtype=DTYPE)
        vc = torch.randn_like(kc)
        q = torch.randn(n, hq, HEAD_SIZE, device="cuda", dtype=DTYPE)
        # Shuffled pages, as a running engine's cache is.
        bt = torch.randperm(blocks, device="cuda", dtype=torch.int32).view(batch, -1)
        qsl = torch.arange(0, n + 1, seq, device="cuda", dtype=torch.int32)
        sl = torch.full((batch,), seq, device="cuda", dtype=torch.int32)
        out = torch.empty_like(q)
        flops = 2 * 2 * batch * hq * seq * seq * HEAD_SIZE / 2
        qs = q.view(batch, seq, hq, HEAD_SIZE).transpose(1, 2).contiguous()
        ks = torch.randn(batch, hq, seq, HEAD_SIZE, device="cuda", dtype=DTYPE)
        vs = torch.randn_like(ks)

        def sdpa(qs=qs, ks=ks, vs=vs):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

        ms_flash = bench(sdpa, rep_ms)
        shape = f"{batch} x {seq}"
        heads = f"{hq}q/{hkv}kv"
        lines.append(
            f"| {heads} | {shape} | SDPA flash | | {ms_flash * 1e3:.1f} "
            f"| {flops / ms_flash / 1e9:.0f} | 100 |"
        )
        ref = None
        for (name, module), config in itertools.chain(
            ((item, None) for item in modules.items()),
            ((("this tree", modules["this tree"]), c) for c in PREFILL_TILES),
        ):
            fn = functools.partial(
                module.paged_attention,
                q,
                kc,
                vc,
                bt,
                qsl,
                sl,
                scale=HEAD_SIZE**-0.5,
                max_query_len=seq,
                max_seq_len=seq,
                out=out,
            )
            try:
                with tile(module, config):
                    result = fn().float()
                    if ref is None:
                        ref = result.clone()
                    err = (result - ref).abs().max().item()
                    ms = bench(fn, rep_ms)
            except Exception as exc:  # e.g. out of shared memory
                lines.append(
                    f"| {heads} | {shape} | {name} | {config} | {type(exc).__name__} | | |"
                )
                continue
            label = "default" if config is None else str(config)
            lines.append(
                f"| {heads} | {shape} | {name} | {label} (max diff {err:.3f}) | {ms * 1e3:.1f} "
                f"| {flops / ms / 1e9:.0f} | {100 * ms_flash / ms:.1f} |"
            )
            print(lines[-1], flush=True)
        del kc, vc, q, ks, vs, qs, out
        torch.cuda.empty_cache()
    return lines


def decode_part(modules: dict[str, ModuleType], replays: int) -> list[str]:
    copy_tbps, _ = copy_bandwidth(200)
    lines = [
        f"## Decode, Qwen2.5-3B heads 16q/2kv, head {HEAD_SIZE} bf16 (1 GiB copy {copy_tbps:.2f} TB/s)",
        "",
        "us per call (graph replays over distinct inputs), TB/s of K/V + q/out bytes.",
        "",
        "| B x ctx | same-size copy TB/s | kernel | tile | splits | merge | us | TB/s | % of copy |",
        "|---|---|---|---|---:|---|---:|---:|---:|",
    ]
    for batch, ctx in DECODE_SHAPES:
        copies = 36 if batch == 1 else None  # batch 1: one input set per layer
        same = same_size_copy_tbps(batch, ctx, 16, 2)
        variants = [
            (name, m, None, s, f)
            for name, m in modules.items()
            for s in (8, 32)
            for f in (True, False)
        ]
        variants += [
            ("this tree", modules["this tree"], t, s, f)
            for t, s, f in itertools.product(DECODE_TILES, DECODE_SPLITS, (True, False))
        ]
        if batch >= 64:
            variants += [("this tree", modules["this tree"], None, 1, False)]
        for name, module, config, splits, fused in variants:
            try:
                with tile(module, config):
                    calls, nbytes = decode_calls(
                        batch, ctx, 16, 2, splits, fused_merge=fused, copies=copies,
                        attention=module.paged_attention,
                    )  # fmt: skip
                    ms = bench_graph(calls, replays)
            except Exception as exc:
                lines.append(
                    f"| {batch} x {ctx} | | {name} | {config} | {splits} | | {type(exc).__name__} | | |"
                )
                continue
            tbps = nbytes / ms / 1e9
            lines.append(
                f"| {batch} x {ctx} | {same:.2f} | {name} | {config or 'default'} | {splits} "
                f"| {'fused' if fused else 'two-launch'} | {ms * 1e3:.2f} | {tbps:.2f} "
                f"| {100 * tbps / copy_tbps:.0f} |"
            )
            print(lines[-1], flush=True)
            del calls
        torch.cuda.empty_cache()
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", help="another copy of mmkernels/paged_attention.py to time")
    ap.add_argument(
        "--only", nargs="+", choices=("prefill", "decode"), default=["prefill", "decode"]
    )
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--replays", type=int, default=20)
    args = ap.parse_args(argv)
    import mmkernels.paged_attention as pa

    modules = {"this tree": pa}
    if args.baseline:
        modules["baseline"] = load_module(args.baseline)
    t0 = time.perf_counter()
    lines = [f"# paged attention sweep on {torch.cuda.get_device_name(0)}", ""]
    if "prefill" in args.only:
        lines += prefill_part(modules, args.rep_ms) + [""]
    if "decode" in args.only:
        lines += decode_part(modules, args.replays) + [""]
    lines.append(f"({time.perf_counter() - t0:.0f} s)")
    write_report("sweep_attention", "\n".join(lines))


if __name__ == "__main__":
    main()
