"""Tensor image operations shared by the per-model preprocessors (torchvision backend).

Each mirrors the arithmetic of HF's torchvision ("fast") image processors, so that the
same uint8 input gives the same float output: resize with antialiasing on uint8, then a
normalize whose mean and std are pre-divided by the rescale factor (HF's fused path).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torchvision.transforms.v2 import functional as tvF

from processors.types import PixelNorm

# PIL resampling codes, as stored in preprocessor configs, to torchvision modes (HF's map).
_RESAMPLE = {
    0: tvF.InterpolationMode.NEAREST_EXACT,
    1: tvF.InterpolationMode.LANCZOS,
    2: tvF.InterpolationMode.BILINEAR,
    3: tvF.InterpolationMode.BICUBIC,
    4: tvF.InterpolationMode.BOX,
    5: tvF.InterpolationMode.HAMMING,
}


def _torchvision_at_least(major: int, minor: int) -> bool:
    parts = torchvision.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


def interpolation_mode(resample: int, device: torch.device) -> tvF.InterpolationMode:
    """Torchvision mode for a PIL resample code; LANCZOS falls back to BICUBIC where HF does."""
    mode = _RESAMPLE.get(int(resample))
    if mode is None and int(resample) != 1:
        raise ValueError(f"unknown resample code {resample}")
    if int(resample) == 1 and (
        mode is None or not _torchvision_at_least(0, 27) or device.type != "cpu"
    ):
        return tvF.InterpolationMode.BICUBIC
    return mode


def resize(images: torch.Tensor, height: int, width: int, resample: int) -> torch.Tensor:
    """Antialiased resize of uint8 images to (height, width).

    Args:
        images: [..., C, H, W] uint8.

    Returns:
        [..., C, height, width] uint8.
    """
    mode = interpolation_mode(resample, images.device)
    return tvF.resize(images, [height, width], interpolation=mode, antialias=True)


def resize_shortest_edge(images: torch.Tensor, shortest_edge: int, resample: int) -> torch.Tensor:
    """Resize so the shorter side is `shortest_edge`, the longer truncated (HF/CLIP rule).

    Args:
        images: [..., C, H, W] uint8.
    """
    height, width = images.shape[-2:]
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    if width <= height:
        return resize(images, new_long, shortest_edge, resample)
    return resize(images, shortest_edge, new_long, resample)


def center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Center crop to (height, width), zero-padding first when the image is smaller (HF rule).

    Args:
        images: [..., C, H, W].
    """
    in_h, in_w = images.shape[-2:]
    if height > in_h or width > in_w:
        pad_ltrb = [
            (width - in_w) // 2 if width > in_w else 0,
            (height - in_h) // 2 if height > in_h else 0,
            (width - in_w + 1) // 2 if width > in_w else 0,
            (height - in_h + 1) // 2 if height > in_h else 0,
        ]
        images = tvF.pad(images, pad_ltrb, fill=0)
        in_h, in_w = images.shape[-2:]
        if (in_h, in_w) == (height, width):
            return images
    top = int((in_h - height) / 2.0)
    left = int((in_w - width) / 2.0)
    return tvF.crop(images, top, left, height, width)


def pad_to_square(images: torch.Tensor, fill: Sequence[int]) -> torch.Tensor:
    """Pad the shorter side symmetrically to a square with a per-channel fill (LLaVA rule).

    Args:
        images: [..., C, H, W].
    """
    height, width = images.shape[-2:]
    if height == width:
        return images
    side = max(height, width)
    left, top = (side - width) // 2, (side - height) // 2
    padding = [left, top, side - width - left, side - height - top]
    return tvF.pad(images, padding=padding, fill=list(fill))


def rescale_and_normalize(
    images: torch.Tensor,
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Rescale then normalize as one float32 normalize (HF's fused rescale + normalize).

    Args:
        images: [..., C, H, W] uint8 or float.

    Returns:
        float32 tensor of the same shape.
    """
    if do_normalize:
        mean_t = torch.tensor(list(mean), device=images.device)
        std_t = torch.tensor(list(std), device=images.device)
        if do_rescale:
            # HF folds the rescale into mean/std; the float rounding of this fold is kept.
            mean_t = mean_t * (1.0 / rescale_factor)
            std_t = std_t * (1.0 / rescale_factor)
        # In place on a fresh float copy: same arithmetic as HF, one allocation fewer.
        x = images.to(torch.float32) if images.dtype != torch.float32 else images.clone()
        return tvF.normalize(x, mean_t, std_t, inplace=True)
    if do_rescale:
        return images.to(torch.float32) * rescale_factor
    return images.to(torch.float32)


def fused_norm(
    rescale_factor: float, mean: Sequence[float], std: Sequence[float], channel_axis: int
) -> PixelNorm:
    """The PixelNorm equal to `rescale_and_normalize(do_rescale=True, do_normalize=True)`:
    mean and std divided by the rescale factor in float32, as HF folds them."""
    mean_t = torch.tensor(list(mean)) * (1.0 / rescale_factor)
    std_t = torch.tensor(list(std)) * (1.0 / rescale_factor)
    return PixelNorm(tuple(mean_t.tolist()), tuple(std_t.tolist()), channel_axis)


def _constants(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """float32 constants on `device` without a host-GPU sync (pinned, asynchronous copy):
    `torch.tensor(values, device="cuda")` would wait for everything queued on the GPU."""
    t = torch.tensor(values, dtype=torch.float32)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def apply_pixel_norm(pixels: torch.Tensor, norm: PixelNorm) -> torch.Tensor:
    """Normalizes uint8 pixels to float32 with the arithmetic of `rescale_and_normalize`
    (a float32 copy, minus mean, divided by std: bit-identical results on any device).

    Args:
        pixels: uint8 (or float) tensor whose rows, flattened from `norm.channel_axis`,
            start with the channel index.
    """
    shape = pixels.shape
    channels = len(norm.mean)
    x = pixels.to(torch.float32) if pixels.dtype != torch.float32 else pixels.clone()
    rows = x.reshape(*shape[: norm.channel_axis], channels, -1)
    view = (channels, 1)
    mean = _constants(norm.mean, x.device).view(view)
    std = _constants(norm.std, x.device).view(view)
    rows.sub_(mean).div_(std)
    return rows.view(shape)
