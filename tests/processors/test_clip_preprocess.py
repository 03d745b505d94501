"""CLIP / LLaVA preprocessing equals HF's torchvision-backed CLIP and LLaVA processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_clip import CLIPImageProcessor
from transformers.models.llava.image_processing_llava import LlavaImageProcessor

from processors.clip import ClipPreprocessor, llava_num_image_tokens
from processors.errors import MediaError
from processors.image import to_rgb_pil
from tests.processors.media_helpers import hf_composites_alpha, random_rgb

torch.set_num_threads(1)

CFG = {
    "size": {"shortest_edge": 42},
    "crop_size": {"height": 42, "width": 42},
    "do_resize": True,
    "do_center_crop": True,
    "resample": 3,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def assert_matches(hf, ours: ClipPreprocessor, image, our_image=None) -> None:
    expected = hf(images=[image], return_tensors="pt")["pixel_values"][0]
    item = ours.preprocess_image(image if our_image is None else our_image, num_tokens=9)
    assert item.pixel_values.shape == expected.shape
    torch.testing.assert_close(item.pixel_values, expected, atol=1e-5, rtol=0)
    assert item.num_tokens == 9 and item.grid_thw is None


@pytest.mark.parametrize(("height", "width"), [(37, 53), (53, 37), (42, 42), (20, 31), (7, 300)])
def test_clip_resize_crop_normalize_equals_hf(height, width):
    image = Image.fromarray(random_rgb(height, width, seed=height + width))
    assert_matches(CLIPImageProcessor(**CFG), ClipPreprocessor.from_config(CFG), image)


def test_crop_larger_than_resized_image_pads_like_hf():
    cfg = {**CFG, "size": {"shortest_edge": 30}, "crop_size": {"height": 36, "width": 33}}
    image = Image.fromarray(random_rgb(31, 45))
    assert_matches(CLIPImageProcessor(**cfg), ClipPreprocessor.from_config(cfg), image)


def test_legacy_int_sizes_read_as_shortest_edge_and_square_crop():
    legacy = {**CFG, "size": 42, "crop_size": 42}
    image = Image.fromarray(random_rgb(50, 64))
    assert_matches(CLIPImageProcessor(**CFG), ClipPreprocessor.from_config(legacy), image)


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_rgba_and_gray_pil_inputs_equal_hf(mode):
    rgba = np.random.default_rng(5).integers(0, 256, (40, 52, 4), dtype=np.uint8)
    image = Image.fromarray(rgba, "RGBA") if mode == "RGBA" else Image.fromarray(rgba[..., 0])
    ours = ClipPreprocessor.from_config(CFG)
    converted = to_rgb_pil(image, on_white=hf_composites_alpha())
    assert_matches(CLIPImageProcessor(**CFG), ours, image, converted)


def test_llava_pad_to_square_with_mean_color_equals_hf():
    cfg = {**CFG, "do_pad": True}
    image = Image.fromarray(random_rgb(30, 70))
    assert_matches(LlavaImageProcessor(**cfg), ClipPreprocessor.from_config(cfg), image)


def test_tensor_input_equals_pil_input():
    array = random_rgb(33, 48)
    ours = ClipPreprocessor.from_config(CFG)
    from_pil = ours.preprocess_image(Image.fromarray(array), num_tokens=1).pixel_values
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    torch.testing.assert_close(ours.preprocess_image(tensor, num_tokens=1).pixel_values, from_pil)


def test_llava_token_count_drops_cls_for_default_strategy_and_keeps_it_for_full():
    assert llava_num_image_tokens(336, 14, "default") == 576
    assert llava_num_image_tokens(336, 14, "full") == 577
    assert llava_num_image_tokens((224, 224), 32, "default") == 49


def test_absurd_aspect_ratio_is_refused_before_a_huge_resize():
    ours = ClipPreprocessor.from_config({**CFG, "size": {"shortest_edge": 336}})
    with pytest.raises(MediaError) as info:
        ours.preprocess_image(Image.new("RGB", (5000, 1)), num_tokens=1)
    assert info.value.status == 400
