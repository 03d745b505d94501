"""CLIP / LLaVA-1.5 preprocessing: shortest-edge resize, center crop, normalize.

Matches HF's torchvision-backed `CLIPImageProcessor` and `LlavaImageProcessor`
(optional pad-to-square with the mean color) on the same RGB uint8 input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from processors.errors import MediaError
from processors.hashing import content_hash
from processors.image import ImageLike, image_to_tensor
from processors.transforms import (
    center_crop,
    fused_norm,
    pad_to_square,
    rescale_and_normalize,
    resize,
    resize_shortest_edge,
)
from processors.types import MultiModalItem

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# A shortest-edge resize makes the long side grow with the aspect ratio; bound it.
MAX_ASPECT_RATIO = 200


def llava_num_image_tokens(
    image_size: int | tuple[int, int],
    patch_size: int,
    vision_feature_select_strategy: str = "default",
    num_additional_image_tokens: int = 1,
) -> int:
    """LLM tokens per image for LLaVA: one per vision patch, plus CLS unless dropped.

    Args:
        image_size: The vision tower's input side (or (height, width)), i.e. the crop size.
        patch_size: The vision tower's patch size.
        vision_feature_select_strategy: "default" drops the CLS feature, "full" keeps it.
        num_additional_image_tokens: Extra features the tower emits (1: CLS).
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    tokens = (height // patch_size) * (width // patch_size) + num_additional_image_tokens
    if vision_feature_select_strategy == "default":
        tokens -= 1
    return tokens


def _hw(value: Any, key_short: str | None = None) -> tuple[int | None, int | None, int | None]:
    """(height, width, shortest_edge) from an int or a HF size dict."""
    if value is None:
        return None, None, None
    if isinstance(value, int):
        return (None, None, value) if key_short else (value, value, None)
    return value.get("height"), value.get("width"), value.get("shortest_edge")


@dataclass(frozen=True)
class ClipSettings:
    """Settings read from a CLIP / LLaVA preprocessor_config.json."""

    shortest_edge: int | None = 224  # resize so the shorter side is this...
    resize_hw: tuple[int, int] | None = None  # ...or to exactly (height, width)
    crop_hw: tuple[int, int] = (224, 224)
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_pad: bool = False  # LLaVA: pad to square with the mean color first
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: int = 3  # PIL code: 3 = bicubic


class ClipPreprocessor:
    """Turns RGB images into [3, crop_h, crop_w] normalized CLIP inputs."""

    def __init__(
        self,
        settings: ClipSettings,
        device: torch.device | str | None = None,
        defer_normalize: bool = False,
    ) -> None:
        self.settings = settings
        self.device = torch.device(device) if device is not None else None
        # Leave pixels uint8 with a PixelNorm for the encoder to apply (see PixelNorm).
        self.defer_normalize = defer_normalize

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, Any],
        *,
        device: torch.device | str | None = None,
        defer_normalize: bool = False,
    ) -> ClipPreprocessor:
        """Build from the contents of a CLIP/LLaVA preprocessor_config.json."""
        size_h, size_w, shortest = _hw(cfg.get("size", {"shortest_edge": 224}), "shortest_edge")
        if shortest is None and not (size_h and size_w):
            raise ValueError("CLIP size must give shortest_edge or height and width")
        crop_h, crop_w, _ = _hw(cfg.get("crop_size", {"height": 224, "width": 224}))
        default = ClipSettings()
        settings = ClipSettings(
            shortest_edge=shortest,
            resize_hw=(size_h, size_w) if shortest is None else None,
            crop_hw=(int(crop_h or 224), int(crop_w or 224)),
            do_resize=bool(cfg.get("do_resize", True)),
            do_center_crop=bool(cfg.get("do_center_crop", True)),
            do_rescale=bool(cfg.get("do_rescale", True)),
            do_normalize=bool(cfg.get("do_normalize", True)),
            do_pad=bool(cfg.get("do_pad", False)),
            rescale_factor=float(cfg.get("rescale_factor", default.rescale_factor)),
            image_mean=tuple(float(v) for v in cfg.get("image_mean") or default.image_mean),
            image_std=tuple(float(v) for v in cfg.get("image_std") or default.image_std),
            resample=int(cfg.get("resample", default.resample)),
        )
        return cls(settings, device, defer_normalize)

    def hash_params(self) -> dict[str, Any]:
        """Everything that changes this preprocessor's output, for content hashes."""
        return {"processor": "clip", **asdict(self.settings)}

    def preprocess_image(
        self,
        image: ImageLike,
        num_tokens: int,
        *,
        source_bytes: bytes | None = None,
        uuid: str | None = None,
    ) -> MultiModalItem:
        """Preprocess one image.

        Args:
            image: RGB (or convertible) PIL image, [H, W, C] uint8 array or [C, H, W]
                uint8 tensor.
            num_tokens: LLM tokens the model makes of it (see `llava_num_image_tokens`).
            source_bytes: The encoded bytes it was decoded from, hashed instead of pixels.
            uuid: Caller-chosen identity that replaces the content hash.

        Returns:
            An item with pixel_values [3, crop_h, crop_w] float32.
        """
        if num_tokens <= 0:
            raise ValueError("num_tokens must be positive")
        s = self.settings
        pixels = image_to_tensor(image)  # [3, H, W] uint8
        if self.device is not None:
            pixels = pixels.to(self.device).contiguous()
        height, width = pixels.shape[-2:]
        if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
            raise MediaError(f"Image aspect ratio must be at most {MAX_ASPECT_RATIO}:1.")
        x = pixels.unsqueeze(0)  # [1, 3, H, W]
        if s.do_pad:
            x = pad_to_square(x, [int(v * 255) for v in s.image_mean])
        if s.do_resize:
            if s.shortest_edge is not None:
                x = resize_shortest_edge(x, s.shortest_edge, s.resample)
            else:
                assert s.resize_hw is not None
                x = resize(x, s.resize_hw[0], s.resize_hw[1], s.resample)
        if s.do_center_crop:
            x = center_crop(x, *s.crop_hw)
        norm = None
        if self.defer_normalize and s.do_rescale and s.do_normalize:
            norm = fused_norm(s.rescale_factor, s.image_mean, s.image_std, 0)
        else:
            x = rescale_and_normalize(
                x, s.do_rescale, s.rescale_factor, s.do_normalize, s.image_mean, s.image_std
            )
        data = source_bytes if source_bytes is not None else pixels
        return MultiModalItem(
            modality="image",
            content_hash=content_hash("image", data, self.hash_params(), uuid=uuid),
            pixel_values=x[0].contiguous(),  # [3, crop_h, crop_w]
            num_tokens=num_tokens,
            pixel_norm=norm,
        )
