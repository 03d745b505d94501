"""Processor settings read from checkpoint folders give HF's outputs for the same folder."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoVideoProcessor

from processors.clip import ClipPreprocessor, llava_num_image_tokens
from processors.hf_config import read_processor_configs
from processors.qwen2_vl import Qwen2VLPreprocessor
from tests.processors.media_helpers import random_rgb

torch.set_num_threads(1)


def test_qwen2_vl_checkpoint_files_match_hf_auto_processors(qwen2_vl_ckpt):
    configs = read_processor_configs(qwen2_vl_ckpt)
    assert configs.image is not None and configs.video is not None
    ours = Qwen2VLPreprocessor.from_config(configs.image, configs.video)
    hf_image = AutoImageProcessor.from_pretrained(qwen2_vl_ckpt)
    assert hf_image.backend == "torchvision"
    image = Image.fromarray(random_rgb(61, 95))
    expected = hf_image(images=[image], return_tensors="pt")
    item = ours.preprocess_image(image)
    assert list(item.grid_thw) == expected["image_grid_thw"][0].tolist()
    torch.testing.assert_close(item.pixel_values, expected["pixel_values"], atol=1e-5, rtol=0)

    hf_video = AutoVideoProcessor.from_pretrained(qwen2_vl_ckpt)
    frames = np.random.default_rng(0).integers(0, 256, (3, 40, 52, 3), dtype=np.uint8)
    expected = hf_video(videos=[frames], return_tensors="pt", cap_pixels_per_frame=False)
    item = ours.preprocess_video(frames, fps=2.0)
    assert list(item.grid_thw) == expected["video_grid_thw"][0].tolist()
    torch.testing.assert_close(
        item.pixel_values, expected["pixel_values_videos"], atol=1e-5, rtol=0
    )


def test_llava_checkpoint_files_match_hf_and_give_the_token_count(llava_ckpt):
    configs = read_processor_configs(llava_ckpt)
    ours = ClipPreprocessor.from_config(configs.image)
    hf = AutoImageProcessor.from_pretrained(llava_ckpt)
    image = Image.fromarray(random_rgb(50, 37))
    expected = hf(images=[image], return_tensors="pt")["pixel_values"][0]
    crop = configs.image["crop_size"]["height"]
    tokens = llava_num_image_tokens(
        crop,
        configs.processor["patch_size"],
        configs.processor["vision_feature_select_strategy"],
        configs.processor["num_additional_image_tokens"],
    )
    item = ours.preprocess_image(image, num_tokens=tokens)
    torch.testing.assert_close(item.pixel_values, expected, atol=1e-5, rtol=0)
    assert item.num_tokens == (crop // configs.processor["patch_size"]) ** 2


def test_nested_transformers5_layout_wins_over_standalone_files(tmp_path):
    (tmp_path / "processor_config.json").write_text(
        json.dumps(
            {
                "processor_class": "Qwen2VLProcessor",
                "image_processor": {"max_pixels": 1234},
                "video_processor": {"max_pixels": 999},
            }
        )
    )
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_pixels": 1}))
    configs = read_processor_configs(tmp_path)
    assert configs.image == {"max_pixels": 1234}
    assert configs.video == {"max_pixels": 999}
    assert configs.processor == {"processor_class": "Qwen2VLProcessor"}


def test_hub_layout_without_video_file_reports_no_video_settings(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136}))
    configs = read_processor_configs(tmp_path)
    assert configs.image == {"min_pixels": 3136} and configs.video is None
