"""Deferred normalization: uint8 pixels + PixelNorm normalize to exactly the float path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from processors.clip import ClipPreprocessor
from processors.qwen2_vl import Qwen2VLPreprocessor
from tests.processors.test_qwen2_vl_preprocess import IMAGE_CFG, VIDEO_CFG

torch.set_num_threads(1)

CLIP_CFG = {
    "crop_size": {"height": 32, "width": 32},
    "size": {"shortest_edge": 32},
    "do_center_crop": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
}


def noise(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(57, 91), (30, 200), (224, 224)])
def test_qwen_deferred_image_normalizes_bit_exactly_to_the_float_path(size) -> None:
    img = noise(*size)
    eager = Qwen2VLPreprocessor.from_config(IMAGE_CFG, VIDEO_CFG).preprocess_image(img)
    deferred = Qwen2VLPreprocessor.from_config(
        IMAGE_CFG, VIDEO_CFG, defer_normalize=True
    ).preprocess_image(img)
    assert deferred.pixel_values.dtype == torch.uint8
    assert deferred.pixel_norm is not None and deferred.pixel_norm.channel_axis == 1
    assert eager.pixel_norm is None
    assert deferred.content_hash == eager.content_hash
    assert (deferred.grid_thw, deferred.num_tokens) == (eager.grid_thw, eager.num_tokens)
    assert torch.equal(deferred.normalized_pixels(), eager.pixel_values)


def test_qwen_deferred_video_with_odd_frame_count_normalizes_bit_exactly() -> None:
    frames = torch.from_numpy(
        np.random.default_rng(1).integers(0, 256, (5, 3, 60, 84), dtype=np.uint8)
    )
    eager = Qwen2VLPreprocessor.from_config(IMAGE_CFG, VIDEO_CFG).preprocess_video(frames, 2.0)
    deferred = Qwen2VLPreprocessor.from_config(
        IMAGE_CFG, VIDEO_CFG, defer_normalize=True
    ).preprocess_video(frames, 2.0)
    assert deferred.pixel_values.dtype == torch.uint8
    assert torch.equal(deferred.normalized_pixels(), eager.pixel_values)


def test_clip_deferred_image_normalizes_bit_exactly_to_the_float_path() -> None:
    img = noise(40, 70, seed=2)
    eager = ClipPreprocessor.from_config(CLIP_CFG).preprocess_image(img, num_tokens=4)
    deferred = ClipPreprocessor.from_config(CLIP_CFG, defer_normalize=True).preprocess_image(
        img, num_tokens=4
    )
    assert deferred.pixel_values.dtype == torch.uint8
    assert deferred.pixel_values.shape == eager.pixel_values.shape == (3, 32, 32)
    assert torch.equal(deferred.normalized_pixels(), eager.pixel_values)


def test_normalizing_is_not_deferred_when_the_config_does_not_normalize() -> None:
    cfg = {**IMAGE_CFG, "do_normalize": False}
    item = Qwen2VLPreprocessor.from_config(cfg, defer_normalize=True).preprocess_image(
        noise(56, 56)
    )
    assert item.pixel_norm is None and item.pixel_values.dtype == torch.float32
