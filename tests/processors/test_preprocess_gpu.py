"""Preprocessing on a CUDA device equals HF's fast processors run on the same device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_clip import CLIPImageProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from processors.clip import ClipPreprocessor
from processors.qwen2_vl import Qwen2VLPreprocessor
from tests.processors.media_helpers import random_rgb

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

QWEN = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 256, "patch_size": 14, "merge_size": 2}
CLIP = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}


@pytest.mark.parametrize(("height", "width"), [(37, 53), (720, 1280), (28, 1000)])
def test_qwen2_vl_image_on_cuda_equals_hf_on_cuda(height, width):
    image = Image.fromarray(random_rgb(height, width))
    expected = Qwen2VLImageProcessor(**QWEN)(images=[image], return_tensors="pt", device="cuda")
    item = Qwen2VLPreprocessor.from_config(QWEN, device="cuda").preprocess_image(image)
    assert item.pixel_values.device.type == "cuda"
    assert list(item.grid_thw) == expected["image_grid_thw"][0].tolist()
    torch.testing.assert_close(
        item.pixel_values, expected["pixel_values"].to("cuda"), atol=1e-5, rtol=0
    )


def test_qwen2_vl_video_on_cuda_equals_hf_on_cuda():
    frames = np.random.default_rng(0).integers(0, 256, (5, 240, 320, 3), dtype=np.uint8)
    expected = Qwen2VLVideoProcessor(**QWEN)(
        videos=[frames], return_tensors="pt", device="cuda", cap_pixels_per_frame=False
    )
    item = Qwen2VLPreprocessor.from_config(QWEN, QWEN, device="cuda").preprocess_video(frames, 2.0)
    assert list(item.grid_thw) == expected["video_grid_thw"][0].tolist()
    torch.testing.assert_close(
        item.pixel_values, expected["pixel_values_videos"].to("cuda"), atol=1e-5, rtol=0
    )


def test_clip_on_cuda_equals_hf_on_cuda():
    image = Image.fromarray(random_rgb(480, 640))
    expected = CLIPImageProcessor(**CLIP)(images=[image], return_tensors="pt", device="cuda")
    item = ClipPreprocessor.from_config(CLIP, device="cuda").preprocess_image(image, num_tokens=576)
    torch.testing.assert_close(
        item.pixel_values, expected["pixel_values"][0].to("cuda"), atol=1e-5, rtol=0
    )
