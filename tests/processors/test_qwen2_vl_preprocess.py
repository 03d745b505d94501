"""Qwen2-VL preprocessing equals HF's torchvision-backed image and video processors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.video_utils import VideoMetadata

from processors.config import MediaConfig
from processors.errors import MediaError
from processors.image import decode_image
from processors.qwen2_vl import Qwen2VLPreprocessor, smart_resize
from processors.video import VideoSampling, sample_frame_indices
from tests.processors.media_helpers import (
    encode,
    exif_rotated_jpeg,
    hf_composites_alpha,
    random_rgb,
)

torch.set_num_threads(1)

IMAGE_CFG = {
    "min_pixels": 28 * 28 * 4,
    "max_pixels": 28 * 28 * 64,
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
}
VIDEO_CFG = {**IMAGE_CFG, "min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16}
ATOL = 1e-5


@pytest.fixture(scope="module")
def hf_image() -> Qwen2VLImageProcessor:
    return Qwen2VLImageProcessor(**IMAGE_CFG)


@pytest.fixture(scope="module")
def hf_video() -> Qwen2VLVideoProcessor:
    return Qwen2VLVideoProcessor(**VIDEO_CFG)


@pytest.fixture(scope="module")
def ours() -> Qwen2VLPreprocessor:
    return Qwen2VLPreprocessor.from_config(IMAGE_CFG, VIDEO_CFG)


def assert_image_matches(hf_image, ours, hf_input, our_input) -> None:
    expected = hf_image(images=[hf_input], return_tensors="pt")
    item = ours.preprocess_image(our_input)
    assert item.modality == "image"
    assert list(item.grid_thw) == expected["image_grid_thw"][0].tolist()
    assert item.num_tokens == int(expected["image_grid_thw"][0].prod()) // 4
    assert item.pixel_values.shape == expected["pixel_values"].shape
    assert item.pixel_values.dtype == torch.float32
    torch.testing.assert_close(item.pixel_values, expected["pixel_values"], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("height", "width"),
    [(37, 53), (28, 1000), (1000, 28), (720, 1280), (5, 7), (13, 2000), (300, 301)],
)
def test_image_pixels_grid_and_tokens_equal_hf_for_odd_and_extreme_sizes(
    hf_image, ours, height, width
):
    image = Image.fromarray(random_rgb(height, width, seed=height * width))
    assert_image_matches(hf_image, ours, image, image)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P_transparent", "CMYK", "I;16"])
def test_decoded_image_of_any_mode_matches_hf_given_the_original_pil_image(hf_image, ours, mode):
    rgb = random_rgb(45, 61, seed=7)
    alpha = np.random.default_rng(8).integers(0, 256, (45, 61), dtype=np.uint8)
    if mode == "L":
        image, fmt = Image.fromarray(rgb[..., 0]), "PNG"
    elif mode == "LA":
        image, fmt = Image.fromarray(np.stack([rgb[..., 0], alpha], -1), "LA"), "PNG"
    elif mode == "RGBA":
        image, fmt = Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"
    elif mode == "P":
        image, fmt = Image.fromarray(rgb).quantize(16), "GIF"
    elif mode == "P_transparent":
        image, fmt = Image.fromarray(rgb).quantize(16), "PNG"
        image.info["transparency"] = 3
    elif mode == "CMYK":
        image, fmt = Image.fromarray(rgb).convert("CMYK"), "TIFF"
    else:
        image, fmt = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG"
    data = encode(image, fmt)
    original = Image.open(io.BytesIO(data))
    assert original.mode == mode.split("_")[0]
    decoded = decode_image(data, MediaConfig(composite_alpha_on_white=hf_composites_alpha()))
    assert decoded.mode == "RGB"
    assert_image_matches(hf_image, ours, original, decoded)


def test_exif_rotated_jpeg_is_upright_and_matches_hf_on_the_transposed_image(hf_image, ours):
    data = exif_rotated_jpeg(height=24, width=40, orientation=6)
    decoded = decode_image(data, MediaConfig())
    assert decoded.size == (24, 40)  # stored 40 wide, shown 24 wide
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert_image_matches(hf_image, ours, upright, decoded)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_numpy_hwc_and_torch_chw_inputs_match_hf_on_the_same_arrays(hf_image, ours, channels):
    rng = np.random.default_rng(channels)
    array = rng.integers(0, 256, (33, 47, channels), dtype=np.uint8)
    if channels == 4 and not hf_composites_alpha():
        pytest.skip("this transformers release does not accept 4-channel arrays")
    assert_image_matches(hf_image, ours, array, array)
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    assert_image_matches(hf_image, ours, tensor, tensor)


def test_size_dict_config_gives_the_same_result_as_min_max_pixels(hf_image):
    sized = {k: v for k, v in IMAGE_CFG.items() if k not in ("min_pixels", "max_pixels")}
    sized["size"] = {
        "shortest_edge": IMAGE_CFG["min_pixels"],
        "longest_edge": IMAGE_CFG["max_pixels"],
    }
    ours = Qwen2VLPreprocessor.from_config(sized)
    image = Image.fromarray(random_rgb(90, 250))
    assert_image_matches(hf_image, ours, image, image)


def test_smart_resize_refuses_aspect_ratio_above_200_with_a_400():
    with pytest.raises(MediaError) as info:
        smart_resize(10, 2010)
    assert info.value.status == 400
    assert "aspect ratio" in info.value.message
    assert smart_resize(10, 2000) == smart_resize(10, 2000)  # exactly 200 is allowed


@pytest.mark.parametrize("num_frames", [1, 3, 4, 5])
def test_video_pixels_and_grid_equal_hf_with_odd_frame_counts(hf_video, ours, num_frames):
    frames = np.random.default_rng(num_frames).integers(
        0, 256, (num_frames, 45, 61, 3), dtype=np.uint8
    )
    expected = hf_video(videos=[frames], return_tensors="pt", cap_pixels_per_frame=False)
    item = ours.preprocess_video(frames, fps=2.0)
    assert list(item.grid_thw) == expected["video_grid_thw"][0].tolist()
    assert item.grid_thw[0] == (num_frames + 1) // 2
    assert item.num_tokens == int(expected["video_grid_thw"][0].prod()) // 4
    torch.testing.assert_close(
        item.pixel_values, expected["pixel_values_videos"], atol=ATOL, rtol=0
    )
    assert item.second_per_grid_t == pytest.approx(1.0)  # temporal_patch_size / fps


def test_video_torch_tchw_and_pil_list_inputs_match_numpy_input(ours):
    frames = np.random.default_rng(1).integers(0, 256, (3, 30, 44, 3), dtype=np.uint8)
    reference = ours.preprocess_video(frames, fps=3.0)
    as_tensor = ours.preprocess_video(torch.from_numpy(frames).permute(0, 3, 1, 2), fps=3.0)
    as_pil = ours.preprocess_video([Image.fromarray(f) for f in frames], fps=3.0)
    for item in (as_tensor, as_pil):
        torch.testing.assert_close(item.pixel_values, reference.pixel_values, atol=0, rtol=0)
    assert reference.second_per_grid_t == pytest.approx(2 / 3)


def test_video_with_cap_pixels_per_frame_matches_hf():
    cfg = {**VIDEO_CFG, "max_pixels": 28 * 28 * 64, "max_video_tokens": 20}
    hf = Qwen2VLVideoProcessor(**cfg)
    ours = Qwen2VLPreprocessor.from_config(IMAGE_CFG, {**cfg, "cap_pixels_per_frame": True})
    frames = np.random.default_rng(2).integers(0, 256, (4, 120, 160, 3), dtype=np.uint8)
    expected = hf(videos=[frames], return_tensors="pt", cap_pixels_per_frame=True)
    item = ours.preprocess_video(frames, fps=2.0)
    assert list(item.grid_thw) == expected["video_grid_thw"][0].tolist()
    torch.testing.assert_close(
        item.pixel_values, expected["pixel_values_videos"], atol=ATOL, rtol=0
    )


def test_hub_layout_without_video_config_uses_image_settings_for_video_like_hf():
    ours = Qwen2VLPreprocessor.from_config(IMAGE_CFG, None)
    hf = Qwen2VLVideoProcessor(**IMAGE_CFG)
    frames = np.random.default_rng(4).integers(0, 256, (2, 100, 90, 3), dtype=np.uint8)
    expected = hf(videos=[frames], return_tensors="pt", cap_pixels_per_frame=False)
    item = ours.preprocess_video(frames, fps=2.0)
    assert list(item.grid_thw) == expected["video_grid_thw"][0].tolist()
    torch.testing.assert_close(
        item.pixel_values, expected["pixel_values_videos"], atol=ATOL, rtol=0
    )


def test_grid_helpers_agree_with_preprocessing_without_pixels(ours):
    item = ours.preprocess_image(Image.fromarray(random_rgb(77, 191)))
    assert ours.image_grid(77, 191) == item.grid_thw
    frames = np.zeros((5, 50, 70, 3), dtype=np.uint8)
    assert ours.video_grid(5, 50, 70) == ours.preprocess_video(frames, fps=2.0).grid_thw


@pytest.mark.parametrize(
    ("total", "source_fps", "fps"),
    [
        (7, 4.0, 2.0),
        (30, 30.0, 2.0),
        (100, 25.0, 2.0),
        (9, 3.0, 1.0),
        (300, 30.0, 0.5),
        (5, 5.0, 2.0),
    ],
)
def test_frame_sampling_by_fps_picks_hf_indices(hf_video, total, source_fps, fps):
    metadata = VideoMetadata(total_num_frames=total, fps=source_fps)
    expected = hf_video.sample_frames(metadata, fps=fps).tolist()
    ours = sample_frame_indices(total, source_fps, VideoSampling(fps=fps, frame_factor=2))
    assert ours == expected


@pytest.mark.parametrize(("total", "num_frames"), [(10, 4), (11, 5), (8, 8)])
def test_frame_sampling_by_count_picks_hf_indices(hf_video, total, num_frames):
    metadata = VideoMetadata(total_num_frames=total, fps=10.0)
    expected = hf_video.sample_frames(metadata, num_frames=num_frames).tolist()
    sampling = VideoSampling(fps=None, num_frames=num_frames, frame_factor=2)
    assert sample_frame_indices(total, 10.0, sampling) == expected


def test_content_hash_uses_source_bytes_when_given_else_pixels(ours):
    image = Image.fromarray(random_rgb(30, 30))
    by_pixels = ours.preprocess_image(image).content_hash
    assert ours.preprocess_image(image.copy()).content_hash == by_pixels
    by_bytes = ours.preprocess_image(image, source_bytes=b"encoded").content_hash
    assert by_bytes != by_pixels
    assert ours.preprocess_image(image, uuid="u1").content_hash.startswith("uuid-")


@pytest.mark.parametrize(("height", "width"), [(28, 28), (56, 84), (336, 504)])
def test_image_patches_gathered_once_equal_the_patches_of_the_two_frame_clip(height, width):
    # An image is a clip of temporal_patch_size copies of one frame; _patchify_image builds
    # its rows without the clip. Pinned against the clip's patches, row for row.
    from processors.qwen2_vl import _patchify, _patchify_image

    s = Qwen2VLPreprocessor.from_config(IMAGE_CFG).image
    frame = torch.randint(0, 256, (1, 3, height, width), dtype=torch.uint8)
    clip = frame.expand(s.temporal_patch_size, -1, -1, -1)
    rows, grid = _patchify_image(frame, s)
    expected_rows, expected_grid = _patchify(clip, s)
    assert grid == expected_grid and torch.equal(rows, expected_rows)


@pytest.mark.parametrize("resample", [2, 3])  # bilinear, bicubic
def test_resize_of_the_decoded_hwc_view_equals_resize_of_contiguous_chw(resample):
    # image_to_tensor hands a PIL image on as a view of its [H, W, 3] memory, which the
    # CPU uint8 resize takes ~3x faster than contiguous CHW; the result must not change.
    from processors.image import image_to_tensor
    from processors.transforms import resize

    image = Image.fromarray(random_rgb(333, 500))
    view = image_to_tensor(image)
    assert not view.is_contiguous() and view.shape == (3, 333, 500)
    for size in [(224, 224), (476, 644), (728, 1288)]:
        fast = resize(view.unsqueeze(0), *size, resample)
        expected = resize(view.contiguous().unsqueeze(0), *size, resample)
        assert torch.equal(fast, expected), size
