"""Data types that cross from the input-processing stage to the encoders and the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PlaceholderRange:
    """Where one multimodal item's embeddings go in the prompt."""

    offset: int  # index of the item's first placeholder token in the prompt token ids
    length: int  # number of placeholder tokens (== embedding rows the encoder produces)


@dataclass
class MultiModalItem:
    """One preprocessed image or video, ready for its vision encoder."""

    modality: str  # "image" or "video"
    # Hex digest naming the content (encoded bytes when there were bytes, else pixels),
    # tagged with modality, size and preprocessing parameters; or the user's uuid.
    content_hash: str
    # Qwen2-VL family: [num_patches, C * temporal_patch * patch * patch] (float32).
    # LLaVA/CLIP: [C, H, W] (float32, normalized).
    pixel_values: torch.Tensor
    num_tokens: int  # embedding rows the encoder produces for this item
    grid_thw: tuple[int, int, int] | None = None  # Qwen2-VL family: (t, h, w) in patches
    second_per_grid_t: float | None = None  # Qwen2.5-VL video: seconds per temporal grid step
    placeholder: PlaceholderRange | None = None  # set by prompt placeholder expansion
    extra: dict[str, float | int | str] = field(default_factory=dict)  # e.g. source fps
