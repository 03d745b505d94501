"""Data types that cross from the input-processing stage to the encoders and the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PlaceholderRange:
    """Where one multimodal item's embeddings go in the prompt."""

    offset: int  # index of the item's first placeholder token in the prompt token ids
    length: int  # number of placeholder tokens (== embedding rows the encoder produces)


@dataclass(frozen=True)
class PixelNorm:
    """A normalization still to apply to uint8 pixels: (x - mean[c]) / std[c] in float32.

    Preprocessors can leave pixels as uint8 (4x fewer bytes than float32 through the
    worker -> frontend -> engine pipes and the host-to-GPU copy) and let the encoder
    normalize on its device. mean and std are already divided by the rescale factor
    (HF's fused rescale + normalize), stored as the exact float32 values HF computes.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Flattening the tensor from this axis on gives rows whose leading part is the
    # channel: Qwen patches [N, C*T*P*P] use 1, CLIP images [C, H, W] use 0.
    channel_axis: int

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels`` normalized to float32, bit-identical to HF's rescale + normalize."""
        from processors.transforms import apply_pixel_norm

        return apply_pixel_norm(pixels, self)


@dataclass
class MultiModalItem:
    """One preprocessed image or video, ready for its vision encoder."""

    modality: str  # "image" or "video"
    # Hex digest naming the content (encoded bytes when there were bytes, else pixels),
    # tagged with modality, size and preprocessing parameters; or the user's uuid.
    content_hash: str
    # Qwen2-VL family: [num_patches, C * temporal_patch * patch * patch].
    # LLaVA/CLIP: [C, H, W]. Normalized float32, or uint8 with `pixel_norm` set.
    pixel_values: torch.Tensor
    num_tokens: int  # embedding rows the encoder produces for this item
    grid_thw: tuple[int, int, int] | None = None  # Qwen2-VL family: (t, h, w) in patches
    second_per_grid_t: float | None = None  # Qwen2.5-VL video: seconds per temporal grid step
    placeholder: PlaceholderRange | None = None  # set by prompt placeholder expansion
    extra: dict[str, float | int | str] = field(default_factory=dict)  # e.g. source fps
    pixel_norm: PixelNorm | None = None  # set when pixel_values are uint8, not normalized

    def normalized_pixels(self, device: torch.device | None = None) -> torch.Tensor:
        """pixel_values as normalized float32 (on `device` when given), whichever way
        they were stored."""
        x = self.pixel_values if device is None else self.pixel_values.to(device)
        if self.pixel_norm is None:
            return x
        return self.pixel_norm.apply(x)
