"""CPU time of one image's trip through input processing, by stage (one torch thread).

An image request's media work runs in an input worker before the engine sees it: the
data: URL's base64 is decoded (`processors/fetch.py`), the PNG/JPEG decoded
(`processors/image.py`), then resized and cut into patch rows (`processors/qwen2_vl.py`,
Qwen2.5-VL-3B's preprocessor settings). Each stage is timed alone on random-noise images
(which compress worst), best of `--reps`, for the sizes given; this is part of every image
request's time to first token and bounds how fast the workers feed the engine.

    python3 benchmarks/bench_media_cpu.py [--sizes 256x256,1280x720,1920x1080] [--reps 7]

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
    write_report("media_cpu", "\n".join(lines), rows)


if __name__ == "__main__":
    main()
