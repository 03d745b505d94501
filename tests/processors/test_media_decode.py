"""Image decoding: format allowlist, pixel limit before decoding, RGB conversion, bad data."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from processors.config import MediaConfig
from processors.errors import MediaDecodeError, MediaLimitError
from processors.image import decode_image, image_to_tensor
from tests.processors.media_helpers import bomb_png, encode, png_bytes, random_rgb

torch.set_num_threads(1)

SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'


def assert_clean_message(error: Exception) -> None:
    message = error.message  # type: ignore[attr-defined]
    assert message and "Traceback" not in message and "/" not in message and "0x" not in message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_allowed_format_decodes_to_rgb(fmt):
    decoded = decode_image(encode(Image.fromarray(random_rgb(12, 17)), fmt), MediaConfig())
    assert decoded.mode == "RGB" and decoded.size == (17, 12)


def test_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buf.getvalue(), MediaConfig()).getpixel((4, 4)) == (255, 0, 0)


def test_truncated_jpeg_is_a_decode_error():
    data = encode(Image.fromarray(random_rgb(64, 64)), "JPEG")
    with pytest.raises(MediaDecodeError) as info:
        decode_image(data[: len(data) // 2], MediaConfig())
    assert info.value.status == 400
    assert "truncated or corrupt" in info.value.message
    assert_clean_message(info.value)


def test_bomb_png_header_is_refused_before_decoding_with_413():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(MediaLimitError) as info:
        decode_image(bomb_png(100_000, 100_000), MediaConfig())
    assert info.value.status == 413
    assert before == Image.MAX_IMAGE_PIXELS  # Pillow's own guard is never switched off
    assert_clean_message(info.value)


def test_pixel_limit_is_checked_before_pixels_are_loaded(monkeypatch):
    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or original(self))
    with pytest.raises(MediaLimitError):
        decode_image(png_bytes(40, 40), MediaConfig(image_max_pixels=1000))
    assert loads == []
    decode_image(png_bytes(20, 20), MediaConfig(image_max_pixels=1000))
    assert loads


@pytest.mark.parametrize(
    "data",
    [b"this is not an image at all", SVG, b"", b"\x89PNG\r\n\x1a\n"],
    ids=["text", "svg", "empty", "png-magic-only"],
)
def test_non_image_and_svg_bytes_are_decode_errors(data):
    with pytest.raises(MediaDecodeError) as info:
        decode_image(data, MediaConfig())
    assert info.value.status == 400
    assert_clean_message(info.value)


def test_formats_outside_the_allowlist_are_refused():
    ppm = encode(Image.fromarray(random_rgb(4, 4)), "PPM")
    with pytest.raises(MediaDecodeError, match="not a supported image format"):
        decode_image(ppm, MediaConfig())
    png = png_bytes()
    with pytest.raises(MediaDecodeError):
        decode_image(png, MediaConfig(image_formats=("JPEG",)))


def test_rgba_is_composited_on_white_like_hf():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 0, 0, 0)  # fully transparent -> white
    rgba[0, 1] = (200, 0, 0, 255)  # opaque -> itself
    decoded = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), MediaConfig())
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((1, 0)) == (200, 0, 0)


def test_alpha_can_be_dropped_instead_to_match_older_transformers():
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 0, 0, 0)
    config = MediaConfig(composite_alpha_on_white=False)
    decoded = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), config)
    assert decoded.getpixel((0, 0)) == (200, 0, 0)
    tensor = image_to_tensor(torch.from_numpy(rgba).permute(2, 0, 1), config)
    assert tensor[:, 0, 0].tolist() == [200, 0, 0]


def test_array_and_tensor_inputs_are_checked_and_converted():
    gray = np.full((5, 6), 7, dtype=np.uint8)
    assert image_to_tensor(gray).shape == (3, 5, 6)
    assert image_to_tensor(torch.zeros(4, 5, 6, dtype=torch.uint8)).shape == (3, 5, 6)
    with pytest.raises(MediaDecodeError, match="uint8"):
        image_to_tensor(np.zeros((5, 6, 3), dtype=np.float32))
    with pytest.raises(MediaDecodeError):
        image_to_tensor(torch.zeros(2, 5, 6, dtype=torch.uint8))
    with pytest.raises(MediaLimitError):
        image_to_tensor(np.zeros((50, 50, 3), dtype=np.uint8), MediaConfig(image_max_pixels=100))
