"""Where the Qwen2.5-VL-3B vision tower spends its GPU time (issue 4).

Builds the tower with random bf16 weights, encodes one W1-sized batch (13 images of
1288x728 = 4784 patches each, ~62k patches: what `max_num_encoder_tokens=16384` admits),
eager and compiled, and prints wall ms, the FLOP floor (linear layers + attention at the
measured bf16 matmul rate) and the top CUDA kernels of the compiled run. Then, for 1 and
for --images images: the host time of one `encode` call (launching, no synchronize) next to
its GPU time (CUDA events), eager and compiled, and the compiled run's top host-side ops:
when host > GPU, the tower is launch-bound and the GPU waits for it.

    python3 benchmarks/profile_encoder.py [--images 13] [--out encoder_profile.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.model_configs import QWEN25_VL_3B  # noqa: E402
from encoders.qwen2_5_vl import Qwen2_5_VLVisionConfig, Qwen2_5_VLVisionEncoder  # noqa: E402
from processors.types import MultiModalItem  # noqa: E402

GRID = (1, 52, 92)  # 728 x 1288 px in 14-px patches


def make_items(n: int, patch_dim: int) -> list[MultiModalItem]:
    t, h, w = GRID
    return [
        MultiModalItem(
            modality="image",
            content_hash=f"img{i}",
            pixel_values=torch.randn(t * h * w, patch_dim),
            num_tokens=t * h * w // 4,
            grid_thw=GRID,
        )
        for i in range(n)
    ]


def timed(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def host_vs_gpu(fn, reps: int = 5) -> tuple[float, float]:
    """Median (host ms to return, GPU ms between events) of `fn`, after one warm call."""
    fn()
    torch.cuda.synchronize()
    host, gpu = [], []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        fn()
        host.append(1e3 * (time.perf_counter() - t0))
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end))
    return sorted(host)[reps // 2], sorted(gpu)[reps // 2]


def flops(cfg: Qwen2_5_VLVisionConfig, n_patches: int, window_len: int, frame_len: int) -> float:
    d, f = cfg.hidden_size, cfg.intermediate_size
    per_token_linear = 2 * (d * 3 * d + d * d + 3 * d * f)  # qkv, proj, gate/up/down
    linear = cfg.depth * n_patches * per_token_linear
    full = len(cfg.fullatt_block_indexes)
    attn = 4 * n_patches * d * (full * frame_len + (cfg.depth - full) * window_len)
    merger = 2 * n_patches / 4 * (4 * d * 4 * d + 4 * d * cfg.out_hidden_size)
    return linear + attn + merger


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=13)
    p.add_argument("--out", type=Path, default=Path("encoder_profile.md"))
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = Qwen2_5_VLVisionConfig.from_hf(QWEN25_VL_3B["vision_config"])
    enc = Qwen2_5_VLVisionEncoder(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    for prm in enc.parameters():
        torch.nn.init.normal_(prm, std=0.02)
    items = make_items(args.images, cfg.patch.patch_dim)
    n = sum(it.pixel_values.shape[0] for it in items)

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = timed(lambda: a @ a)
    tflops = 2 * 8192**3 / mm_ms / 1e9
    floor_ms = flops(cfg, n, 64, GRID[1] * GRID[2]) / tflops / 1e9

    lines = [
        f"# Qwen2.5-VL-3B vision tower, {args.images} images, {n} patches, "
        f"{torch.cuda.get_device_name(0)}",
        "",
        f"- bf16 matmul {tflops:.0f} TFLOP/s; FLOP floor {floor_ms:.1f} ms",
    ]
    eager_ms = timed(lambda: enc.encode(items))
    lines.append(f"- eager: {eager_ms:.1f} ms ({floor_ms / eager_ms:.0%} of floor)")
    launch = [
        ("eager", k, *host_vs_gpu(lambda k=k: enc.encode(items[:k]))) for k in (1, len(items))
    ]
    enc.compile_blocks()
    for _ in range(2):
        enc.encode(items)
        enc.encode(items[:1])
    comp_ms = timed(lambda: enc.encode(items))
    lines.append(f"- compiled: {comp_ms:.1f} ms ({floor_ms / comp_ms:.0%} of floor)")
    launch += [
        ("compiled", k, *host_vs_gpu(lambda k=k: enc.encode(items[:k]))) for k in (1, len(items))
    ]
    # The window blocks' attention through mmkernels/segment_attention.py (opt-in in the engine).
    enc.short_segment_kernel = True
    try:
        seg_ms = timed(lambda: enc.encode(items))
        lines.append(
            f"- compiled + segment kernel: {seg_ms:.1f} ms ({floor_ms / seg_ms:.0%} of floor)"
        )
        launch += [
            ("compiled + segment kernel", k, *host_vs_gpu(lambda k=k: enc.encode(items[:k])))
            for k in (1, len(items))
        ]
    except Exception as e:  # report it; the rest of the profile still runs
        lines.append(f"- compiled + segment kernel: failed: {type(e).__name__}: {e}"[:400])
    enc.short_segment_kernel = False
    lines += ["", "| blocks | images | host ms (launch) | GPU ms |", "|---|---|---|---|"]
    lines += [f"| {m} | {k} | {h:.1f} | {g:.1f} |" for m, k, h, g in launch]
    from torch.profiler import ProfilerActivity as PA
    from torch.profiler import profile as host_profile

    with host_profile(activities=[PA.CPU]) as hprof:
        enc.encode(items[:1])
    torch.cuda.synchronize()
    host_table = hprof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70
    )
    lines += [
        "",
        "Host side of one compiled 1-image encode (self CPU time):",
        "```",
        host_table,
        "```",
    ]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        enc.encode(items)
        torch.cuda.synchronize()
    table = prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=25, max_name_column_width=70
    )
    lines += ["", "```", table, "```"]
    text = "\n".join(lines)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
