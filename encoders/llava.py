"""LLaVA-1.5 image encoder: CLIP features of a chosen layer through a two-layer projector."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from encoders.base import VisionEncoder
from encoders.clip import CLIP_FUSED, CLIPVisionConfig, CLIPVisionTower
from encoders.layers import get_activation
from encoders.staging import PinnedStaging, stage_pixels
from encoders.weights import WeightLayout
from processors.types import MultiModalItem


@dataclass(frozen=True)
class LlavaVisionConfig:
    """The fields of a LLaVA config the image encoder needs."""

    vision: CLIPVisionConfig
    feature_layers: tuple[int, ...]  # `vision_feature_layer` (an int or a list of ints)
    keep_cls: bool  # `vision_feature_select_strategy` == "full" keeps the CLS token
    projector_act: str
    projector_bias: bool
    text_hidden_size: int  # the LLM's hidden size = projector output

    @classmethod
    def from_hf(
        cls, hf_config: dict[str, Any], weights: Mapping[str, torch.Tensor]
    ) -> LlavaVisionConfig:
        """Reads a hub or transformers-5 LLaVA config.

        Hub configs often omit `text_config.hidden_size` (the Llama default applies); it is
        then read from the projector's weight shape rather than guessed.
        """
        layer = hf_config.get("vision_feature_layer", -2)
        strategy = hf_config.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}")
        text_hidden = (hf_config.get("text_config") or {}).get("hidden_size")
        if text_hidden is None:
            for key in ("multi_modal_projector.linear_2.weight",
                        "model.multi_modal_projector.linear_2.weight"):  # fmt: skip
                if key in weights:
                    text_hidden = weights[key].shape[0]
                    break
            else:
                raise ValueError("text hidden size: neither in the config nor in the weights")
        return cls(
            vision=CLIPVisionConfig.from_hf(hf_config.get("vision_config") or {}),
            feature_layers=tuple(layer) if isinstance(layer, list | tuple) else (layer,),
            keep_cls=strategy == "full",
            projector_act=hf_config.get("projector_hidden_act", "gelu"),
            projector_bias=hf_config.get("multimodal_projector_bias", True),
            text_hidden_size=int(text_hidden),
        )


class LlavaProjector(nn.Module):
    """linear_2(act(linear_1(features)))."""

    def __init__(self, cfg: LlavaVisionConfig) -> None:
        super().__init__()
        in_dim = cfg.vision.hidden_size * len(cfg.feature_layers)
        self.linear_1 = nn.Linear(in_dim, cfg.text_hidden_size, bias=cfg.projector_bias)
        self.linear_2 = nn.Linear(
            cfg.text_hidden_size, cfg.text_hidden_size, bias=cfg.projector_bias
        )
        self.act = get_activation(cfg.projector_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaVisionEncoder(VisionEncoder):
    """CLIP tower + projector; images are batched (all share CLIP's fixed input size)."""

    _staging: PinnedStaging | None = None  # created on first use

    def __init__(self, cfg: LlavaVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_hidden_size = cfg.text_hidden_size
        self.vision_tower = CLIPVisionTower(cfg.vision, cfg.feature_layers)
        self.multi_modal_projector = LlavaProjector(cfg)

    @property
    def tokens_per_image(self) -> int:
        """Embedding rows per image: one per patch, plus CLS with the "full" strategy."""
        return self.cfg.vision.grid**2 + int(self.cfg.keep_cls)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [B, C, S, S] -> [B, tokens_per_image, text_hidden]
        features = self.vision_tower(pixel_values)
        if not self.cfg.keep_cls:
            features = features[:, 1:]
        return self.multi_modal_projector(features)

    def _check(self, item: MultiModalItem) -> None:
        v = self.cfg.vision
        expected = (v.num_channels, v.image_size, v.image_size)
        if tuple(item.pixel_values.shape) != expected:
            raise ValueError(
                f"item {item.content_hash}: pixel_values shape "
                f"{tuple(item.pixel_values.shape)}, expected {expected}"
            )
        if item.num_tokens != self.tokens_per_image:
            raise ValueError(
                f"item {item.content_hash}: num_tokens {item.num_tokens}, "
                f"expected {self.tokens_per_image}"
            )

    # no_grad rather than inference_mode: outputs are cached and handed to other processes,
    # and inference tensors refuse in-place ops (share_memory_, copies into) outside it.
    @torch.no_grad()
    def encode(self, items: Sequence[MultiModalItem]) -> list[torch.Tensor]:
        """Encodes images in one batched forward.

        Args:
            items: images with pixel_values [C, image_size, image_size] (normalized).

        Returns:
            Per item, [tokens_per_image, text_hidden_size] embeddings (views of one tensor).
        """
        if not items:
            return []
        for item in items:
            self._check(item)
        # One pinned host buffer and one asynchronous copy (per-item `.to(device)` copies
        # of pageable memory would each make the host wait for the GPU).
        if self._staging is None:
            self._staging = PinnedStaging()
        pixels = stage_pixels(self._staging, items, self.device, self.dtype, stack=True)
        return list(self.forward(pixels).unbind(0))


def llava_weight_layout(encoder: LlavaVisionEncoder) -> WeightLayout:
    """Accepts the hub layout (`vision_tower.vision_model.*`, `multi_modal_projector.*`) and
    the transformers-5 ones (`model.vision_tower.[vision_model.]*`, `vision_tower.*`,
    `model.multi_modal_projector.*`)."""
    tower_prefixes = (
        "model.vision_tower.vision_model.",
        "vision_tower.vision_model.",
        "model.vision_tower.",
        "vision_tower.",
    )
    projector_prefixes = ("model.multi_modal_projector.", "multi_modal_projector.")

    def to_local(key: str) -> str | None:
        for prefix in tower_prefixes:
            if key.startswith(prefix):
                return "vision_tower." + key[len(prefix) :]
        for prefix in projector_prefixes:
            if key.startswith(prefix):
                return "multi_modal_projector." + key[len(prefix) :]
        return None

    def ignored(name: str) -> bool:
        tower = "vision_tower."
        return name.startswith(tower) and encoder.vision_tower.is_unused_weight(name[len(tower) :])

    def to_hub(name: str) -> str:
        if name.startswith("vision_tower."):
            return "vision_tower.vision_model." + name[len("vision_tower.") :]
        return name

    return WeightLayout(to_local=to_local, fused=CLIP_FUSED, ignored=ignored, to_hub=to_hub)
