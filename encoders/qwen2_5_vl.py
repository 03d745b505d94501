"""Qwen2.5-VL vision transformer: window attention (full attention in a few blocks),
RMSNorm, gated SiLU MLP, RMSNorm patch merger."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.layers import RMSNorm, SegmentPlan, get_activation
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
from encoders.staging import host_to_device


@dataclass(frozen=True)
class Qwen2_5_VLVisionConfig:
    """The fields of a Qwen2.5-VL `vision_config` the tower needs."""

    patch: QwenPatchConfig
    depth: int  # number of blocks
    hidden_size: int  # tower width
    intermediate_size: int  # gated MLP width
    num_heads: int
    hidden_act: str  # MLP gate activation
    out_hidden_size: int  # merger output = the LLM's hidden size
    window_size: int  # attention window side, in pixels
    fullatt_block_indexes: tuple[int, ...]  # blocks attending over whole frames

    @classmethod
    def from_hf(cls, vision_config: dict[str, Any]) -> Qwen2_5_VLVisionConfig:
        """Reads a hub or transformers-5 `vision_config` dict, with HF's defaults."""
        return cls(
            patch=QwenPatchConfig.from_hf(vision_config),
            depth=vision_config.get("depth", 32),
            hidden_size=vision_config.get("hidden_size", 3584),
            intermediate_size=vision_config.get("intermediate_size", 3420),
            num_heads=vision_config.get("num_heads", 16),
            hidden_act=vision_config.get("hidden_act", "silu"),
            out_hidden_size=vision_config.get("out_hidden_size", 3584),
            window_size=vision_config.get("window_size", 112),
            fullatt_block_indexes=tuple(
                vision_config.get("fullatt_block_indexes", (7, 15, 23, 31))
            ),
        )

    @property
    def merged_window(self) -> int:
        """Window side in merged tokens (112 px / 14 px / 2 = 4)."""
        return self.window_size // self.patch.spatial_merge_size // self.patch.patch_size


def window_order(grids: Sequence[Grid], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Orders merged tokens window by window, as HF's `get_window_index` does.

    Per item and temporal step, windows of `window` x `window` merged tokens are taken in
    raster order (the last row/column of windows may be partial), and inside a window the
    tokens are in raster order.

    Returns:
        order: [N / m^2] merged-token indices (into packed order) in window order.
        lengths: patches per non-empty window, in window order.
    """
    orders: list[torch.Tensor] = []
    lengths: list[int] = []
    offset = 0
    for t, h, w in grids:
        lh, lw = h // merge, w // merge
        wins_h, wins_w = math.ceil(lh / window), math.ceil(lw / window)
        index = torch.arange(t * lh * lw).view(t, lh, lw)
        # Pad to whole windows with -1 so every window is a full square slice.
        index = F.pad(index, (0, wins_w * window - lw, 0, wins_h * window - lh), value=-1)
        windows = index.view(t, wins_h, window, wins_w, window).permute(0, 1, 3, 2, 4)
        windows = windows.reshape(t * wins_h * wins_w, window * window)
        valid = windows >= 0
        orders.append(windows[valid] + offset)
        lengths.extend((valid.sum(dim=1) * merge * merge).tolist())
        offset += t * lh * lw
    return torch.cat(orders), lengths


class Qwen2_5_VLMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up fused into one matmul at load."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden)
        self.down_proj = nn.Linear(hidden, dim)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class Qwen2_5_VLBlock(QwenVisionBlock):
    def __init__(self, cfg: Qwen2_5_VLVisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.attn = QwenVisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = Qwen2_5_VLMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)


# Checkpoint tensors concatenated into one parameter at load.
QWEN2_5_VL_FUSED = {
    "gate_up_proj.weight": ("gate_proj.weight", "up_proj.weight"),
    "gate_up_proj.bias": ("gate_proj.bias", "up_proj.bias"),
}


class Qwen2_5_VLVisionEncoder(QwenVisionEncoder):
    """Qwen2.5-VL's vision tower; parameter names match the checkpoint's `visual.*` keys
    except the fused `mlp.gate_up_proj` (see QWEN2_5_VL_FUSED)."""

    def __init__(self, cfg: Qwen2_5_VLVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch = cfg.patch
        self.text_hidden_size = cfg.out_hidden_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = self._make_patch_embed(cfg.hidden_size)
        self.blocks = nn.ModuleList(Qwen2_5_VLBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(
            cfg.out_hidden_size, cfg.hidden_size, cfg.patch.merge_unit, rms_norm=True
        )
        self.rotary = VisionRotary(cfg.hidden_size // cfg.num_heads, cfg.patch.rope_theta)

    def forward(self, patches: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        # patches: [N, C * T * P * P] -> [N / m^2, out_hidden_size]
        device = patches.device
        unit = self.patch.merge_unit
        order, window_lengths = window_order(
            grids, self.patch.spatial_merge_size, self.cfg.merged_window
        )
        # Token-level permutation moving whole merge blocks into window order; frames stay
        # contiguous, so the per-frame segments of the full-attention blocks still hold.
        token_order = (order[:, None] * unit + torch.arange(unit)).flatten()  # [N]
        token_order = host_to_device(token_order, device)
        cos, sin = self.rotary.tables(patch_positions(grids, self.patch.spatial_merge_size), device)
        cos, sin = cos[token_order], sin[token_order]
        full_plan = SegmentPlan.from_lengths(frame_lengths(grids), device)
        window_plan = SegmentPlan.from_lengths(
            window_lengths, device, short_kernel=self.short_segment_kernel
        )

        x = self.patch_embed.proj(patches)[token_order]  # [N, hidden], window order
        for i, block in enumerate(self.blocks):
            plan = full_plan if i in self.cfg.fullatt_block_indexes else window_plan
            x = block(x, cos, sin, plan)
        merged = self.merger(x)  # [N / m^2, out], window order
        restore = torch.empty_like(order)
        restore[order] = torch.arange(order.numel())
        return merged[host_to_device(restore, device)]
