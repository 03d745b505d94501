"""Builders of small encoded images and videos for the processors tests."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """[H, W, 3] uint8 noise."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_bytes(height: int = 20, width: int = 30, seed: int = 0) -> bytes:
    return encode(Image.fromarray(random_rgb(height, width, seed)), "PNG")


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose IHDR claims `width` x `height` (valid CRCs, almost no data)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated_jpeg(height: int = 24, width: int = 40, orientation: int = 6) -> bytes:
    """A JPEG stored landscape with an EXIF Orientation tag (6: rotate 90° clockwise)."""
    image = Image.fromarray(random_rgb(height, width, seed=3))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95)


def mp4_bytes(num_frames: int = 7, fps: int = 4, height: int = 32, width: int = 48) -> bytes:
    """An MPEG-4 Part 2 video of moving gradients (lossy: compare decoded frames only)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        ys, xs = np.mgrid[0:height, 0:width]
        for i in range(num_frames):
            frame = np.stack(
                [(xs * 5 + i * 20) % 256, (ys * 7 + i * 10) % 256, (xs + ys + i * 30) % 256], -1
            ).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def hf_composites_alpha() -> bool:
    """Whether the installed transformers puts transparent pixels on white (5.24) or drops
    alpha (5.17 and older): the tests then compare against the matching rule of ours."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    pixel = Image.fromarray(np.array([[[200, 0, 0, 0]]], dtype=np.uint8), "RGBA")
    converted = Qwen2VLImageProcessor().process_image(pixel, do_convert_rgb=True)
    return int(converted.flatten()[0]) == 255
