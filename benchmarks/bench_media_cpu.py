"""CPU time of one image's (and one video's) trip through input processing, by stage.

An image request's media work runs in an input worker before the engine sees it: the
data: URL's base64 is decoded (`processors/fetch.py`), the PNG/JPEG decoded
(`processors/image.py`), then resized and cut into patch rows (`processors/qwen2_vl.py`,
Qwen2.5-VL-3B's preprocessor settings). Each stage is timed alone on random-noise images
(which compress worst), best of `--reps`, for the sizes given; this is part of every image
request's time to first token and bounds how fast the workers feed the engine.

    python3 benchmarks/bench_media_cpu.py [--sizes 256x256,1280x720,1920x1080] [--reps 7]
        [--video-frames 64]

A video row follows: a clip of `--video-frames` noise frames at 640x360, 8 fps (MPEG-4
Part 2, made with PyAV), decoded with the default frame sampling, then preprocessed.

Writes $OUT/media_cpu.md (and .json).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.model_configs import write_config_dir  # noqa: E402
from benchmarks.report import write_report  # noqa: E402


def _best_ms(reps: int, fn, *args: object, **kwargs: object) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="256x256,1280x720,1920x1080", help="WxH,...")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--video-frames", type=int, default=64, help="0: no video row")
    args = ap.parse_args(argv)
    from mmengine.input_processor import InputProcessor
    from processors.fetch import fetch_media
    from processors.image import decode_image

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        write_config_dir("qwen2.5-vl-3b", Path(tmp))
        proc = InputProcessor(tmp, json.loads((Path(tmp) / "config.json").read_text()))
    rng = np.random.default_rng(0)
    rows = []
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.split("x"))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            buf, format="PNG"
        )
        png = buf.getvalue()
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        image = decode_image(png, proc.media)
        item = proc.qwen.preprocess_image(image, source_bytes=png)
        fetch = _best_ms(args.reps, fetch_media, url, proc.media, modality="image")
        decode = _best_ms(args.reps, decode_image, png, proc.media)
        prep = _best_ms(args.reps, proc.qwen.preprocess_image, image, source_bytes=png)
        rows.append(
            dict(
                size=size,
                png_mb=len(png) / 1e6,
                patches=list(item.pixel_values.shape),
                base64_ms=fetch,
                png_decode_ms=decode,
                preprocess_ms=prep,
                total_ms=fetch + decode + prep,
            )
        )
        print(rows[-1], flush=True)
    video_row = _video_row(proc, args) if args.video_frames else None
    lines = [
        f"# Image input processing on the CPU ({platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, 1 thread)",
        "",
        "| image | PNG MB | patch rows | data: URL base64 ms | PNG decode ms | resize + "
        "patches ms | total ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['png_mb']:.2f} | {r['patches'][0]} | {r['base64_ms']:.2f} | "
            f"{r['png_decode_ms']:.2f} | {r['preprocess_ms']:.2f} | {r['total_ms']:.2f} |"
        )
    if video_row is not None:
        lines += [
            "",
            "| video | MB | frames decoded | patch rows | decode ms | preprocess ms | total ms |",
            "|---|---|---|---|---|---|---|",
            f"| {video_row['size']} | {video_row['mb']:.2f} | {video_row['frames']} | "
            f"{video_row['patches'][0]} | {video_row['decode_ms']:.2f} | "
            f"{video_row['preprocess_ms']:.2f} | {video_row['total_ms']:.2f} |",
        ]
        rows.append(video_row)
    write_report("media_cpu", "\n".join(lines), rows)


def _video_row(proc, args: argparse.Namespace) -> dict:  # noqa: ANN001
    import av

    from processors.video import decode_video

    width, height, count = 640, 360, args.video_frames
    buf = io.BytesIO()
    rng = np.random.default_rng(1)
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(count):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    raw = buf.getvalue()
    sampling = proc.qwen.video_sampling(proc.media)
    video = decode_video(raw, proc.media, sampling, deadline_s=60.0)
    item = proc.qwen.preprocess_video(video.frames, video.fps, source_bytes=raw)
    decode = _best_ms(args.reps, decode_video, raw, proc.media, sampling, deadline_s=60.0)
    prep = _best_ms(
        args.reps, proc.qwen.preprocess_video, video.frames, video.fps, source_bytes=raw
    )
    row = dict(
        size=f"{count} x {width}x{height} @ 8 fps",
        mb=len(raw) / 1e6,
        frames=int(video.frames.shape[0]),
        patches=list(item.pixel_values.shape),
        decode_ms=decode,
        preprocess_ms=prep,
        total_ms=decode + prep,
    )
    print(row, flush=True)
    return row


if __name__ == "__main__":
    main()
