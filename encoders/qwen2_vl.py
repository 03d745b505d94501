"""Qwen2-VL vision transformer: patch embed, 2-D rotary LayerNorm blocks, patch merger."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from encoders.layers import SegmentPlan, get_activation
from encoders.qwen_vision import (
    Grid,
    PatchMerger,
    QwenPatchConfig,
    QwenVisionAttention,
    QwenVisionBlock,
    QwenVisionEncoder,
    VisionRotary,
    frame_lengths,
    patch_positions,
)
from encoders.weights import WeightLayout


@dataclass(frozen=True)
class Qwen2VLVisionConfig:
    """The fields of a Qwen2-VL `vision_config` the tower needs."""

    patch: QwenPatchConfig
    depth: int  # number of blocks
    embed_dim: int  # tower width
    num_heads: int
    mlp_ratio: float  # MLP hidden = embed_dim * mlp_ratio
    hidden_act: str  # MLP activation
    out_hidden_size: int  # merger output = the LLM's hidden size ("hidden_size" in the config)

    @classmethod
    def from_hf(cls, vision_config: dict[str, Any]) -> Qwen2VLVisionConfig:
        """Reads a hub or transformers-5 `vision_config` dict, with HF's defaults."""
        return cls(
            patch=QwenPatchConfig.from_hf(vision_config),
            depth=vision_config.get("depth", 32),
            embed_dim=vision_config.get("embed_dim", 1280),
            num_heads=vision_config.get("num_heads", 16),
            mlp_ratio=vision_config.get("mlp_ratio", 4),
            hidden_act=vision_config.get("hidden_act", "quick_gelu"),
            out_hidden_size=vision_config.get("hidden_size", 3584),
        )


class Qwen2VLMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Qwen2VLBlock(QwenVisionBlock):
    def __init__(self, cfg: Qwen2VLVisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = QwenVisionAttention(cfg.embed_dim, cfg.num_heads)
        self.mlp = Qwen2VLMLP(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), cfg.hidden_act)


class Qwen2VLVisionEncoder(QwenVisionEncoder):
    """Qwen2-VL's vision tower; parameter names match the checkpoint's `visual.*` keys."""

    def __init__(self, cfg: Qwen2VLVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch = cfg.patch
        self.text_hidden_size = cfg.out_hidden_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = self._make_patch_embed(cfg.embed_dim)
        self.blocks = nn.ModuleList(Qwen2VLBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(
            cfg.out_hidden_size, cfg.embed_dim, cfg.patch.merge_unit, rms_norm=False
        )
        self.rotary = VisionRotary(cfg.embed_dim // cfg.num_heads, cfg.patch.rope_theta)

    def forward(self, patches: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        # patches: [N, C * T * P * P] -> [N / m^2, out_hidden_size]
        device = patches.device
        cos, sin = self.rotary.tables(patch_positions(grids, self.patch.spatial_merge_size), device)
        plan = SegmentPlan.from_lengths(frame_lengths(grids), device)
        x = self.patch_embed.proj(patches)  # [N, embed_dim]
        for block in self.blocks:
            x = block(x, cos, sin, plan)
        return self.merger(x)


def qwen_weight_layout(fused: dict[str, tuple[str, ...]] | None = None) -> WeightLayout:
    """Accepts the hub layout (`visual.*`) and the transformers-5 one (`model.visual.*`)."""

    def to_local(key: str) -> str | None:
        for prefix in ("model.visual.", "visual."):
            if key.startswith(prefix):
                return key[len(prefix) :]
        return None

    return WeightLayout(to_local=to_local, fused=fused or {}, to_hub=lambda name: "visual." + name)
