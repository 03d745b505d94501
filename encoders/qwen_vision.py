"""Pieces shared by the Qwen2-VL and Qwen2.5-VL vision towers: patch geometry, 2-D rotary
positions in merge-window order, the attention block, the patch merger and packing."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from encoders.base import VisionEncoder
from encoders.layers import PatchLinear, RMSNorm, SegmentPlan, apply_rotary, segment_attention
from encoders.staging import PinnedStaging, host_to_device, stage_pixels
from processors.types import MultiModalItem

Grid = tuple[int, int, int]  # (t, h, w) in patches


@dataclass(frozen=True)
class QwenPatchConfig:
    """How pixels become patches and patches become LLM tokens."""

    in_channels: int  # image channels (3)
    patch_size: int  # spatial patch side in pixels
    temporal_patch_size: int  # frames per temporal patch (images are repeated to fill it)
    spatial_merge_size: int  # m: each LLM token merges an m x m block of patches
    rope_theta: float  # base of the vision tower's 2-D rotary embedding

    @classmethod
    def from_hf(cls, vision_config: dict[str, Any]) -> QwenPatchConfig:
        """Reads hub-layout (`in_chans`, `rope_theta`) or transformers-5 (`in_channels`,
        `rope_parameters`) vision configs, with HF's defaults for absent keys."""
        rope = vision_config.get("rope_parameters") or {}
        return cls(
            in_channels=vision_config.get("in_channels", vision_config.get("in_chans", 3)),
            patch_size=vision_config.get("patch_size", vision_config.get("spatial_patch_size", 14)),
            temporal_patch_size=vision_config.get("temporal_patch_size", 2),
            spatial_merge_size=vision_config.get("spatial_merge_size", 2),
            rope_theta=float(rope.get("rope_theta", vision_config.get("rope_theta", 10000.0))),
        )

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches per LLM token: m * m."""
        return self.spatial_merge_size**2


def frame_lengths(grids: Sequence[Grid]) -> list[int]:
    """Full-attention segments: every temporal step of every item attends on its own."""
    return [h * w for t, h, w in grids for _ in range(t)]


def patch_positions(grids: Sequence[Grid], merge: int) -> torch.Tensor:
    """(row, col) of every patch in the processor's order, [N, 2] int64.

    The processor emits the patches of each m x m merge block consecutively (block rows,
    block cols, then the rows and cols inside the block), repeated for each temporal step.
    """
    positions = []
    for t, h, w in grids:
        rows = torch.arange(h).view(h // merge, 1, merge, 1).expand(-1, w // merge, -1, merge)
        cols = torch.arange(w).view(1, w // merge, 1, merge).expand(h // merge, -1, merge, -1)
        frame = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1)  # [h * w, 2]
        positions.append(frame.repeat(t, 1))
    return torch.cat(positions)


class VisionRotary:
    """2-D rotary tables: half of each head's rotary pairs turn with the patch row, half
    with the column; the frequencies are those of a 1-D RoPE over head_dim / 2."""

    def __init__(self, head_dim: int, theta: float) -> None:
        half = head_dim // 2
        # On the host explicitly: encoders are constructed under a meta-device context.
        steps = torch.arange(0, half, 2, dtype=torch.float, device="cpu")
        self.inv_freq = 1.0 / (theta ** (steps / half))  # [head_dim / 4]

    def tables(
        self, positions: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns float32 (cos, sin), each [N, head_dim], for `positions` [N, 2]."""
        # Both through pinned memory: a pageable copy would make the host wait for the GPU.
        pos = host_to_device(positions, device)
        freqs = pos[..., None].float() * host_to_device(self.inv_freq, device)  # [N, 2, hd/4]
        freqs = freqs.flatten(1)  # [N, hd/2]: row frequencies then column frequencies
        angles = torch.cat([freqs, freqs], dim=-1)  # [N, hd]
        return angles.cos(), angles.sin()


class QwenVisionAttention(nn.Module):
    """Holds the fused QKV and output projections (checkpoint names `attn.qkv`, `attn.proj`)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class QwenVisionBlock(nn.Module):
    """x + attn(norm1(x)), then + mlp(norm2(x)), with 2-D rotary on q and k.

    Split around the segment attention: the two halves are pure tensor functions of
    dynamic length (what `torch.compile` fuses well), while the attention between them
    depends on the Python-side SegmentPlan. Subclasses set norm1, norm2, attn and mlp.
    """

    norm1: nn.Module
    norm2: nn.Module
    attn: QwenVisionAttention
    mlp: nn.Module

    def attention_inputs(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        # x: [N, dim]; cos, sin: [N, head_dim] float32 -> qkv: [N, 3, H, head_dim]
        qkv = self.attn.qkv(self.norm1(x)).unflatten(-1, (3, self.attn.num_heads, -1))
        qk = apply_rotary(qkv[:, :2], cos[:, None, None], sin[:, None, None])
        return torch.cat([qk, qkv[:, 2:]], dim=1)

    def residual_and_mlp(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        # x: [N, dim]; attn_out: [N, dim] before the output projection
        x = x + self.attn.proj(attn_out)
        return x + self.mlp(self.norm2(x))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: SegmentPlan
    ) -> torch.Tensor:
        attn_out = segment_attention(self.attention_inputs(x, cos, sin), plan)
        return self.residual_and_mlp(x, attn_out)


class PatchMerger(nn.Module):
    """Norm each patch, concatenate each m x m block (consecutive rows), then an MLP."""

    def __init__(self, out_dim: int, dim: int, merge_unit: int, rms_norm: bool) -> None:
        super().__init__()
        self.in_dim = dim * merge_unit
        self.ln_q = RMSNorm(dim, eps=1e-6) if rms_norm else nn.LayerNorm(dim, eps=1e-6)
        # Sequential only so the parameter names match checkpoints (mlp.0, mlp.2).
        self.mlp = nn.Sequential(
            nn.Linear(self.in_dim, self.in_dim), nn.GELU(), nn.Linear(self.in_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, dim] -> [N / merge_unit, out_dim]
        return self.mlp(self.ln_q(x).reshape(-1, self.in_dim))


class QwenVisionEncoder(VisionEncoder):
    """Packs Qwen-family items into one forward over concatenated patches."""

    patch: QwenPatchConfig
    blocks: nn.ModuleList
    _staging: PinnedStaging | None = None  # created on first use
    # Window attention through mmkernels/segment_attention.py on CUDA (opt-in: the engine's
    # extra={"vision_segment_kernel": True}); full-frame segments keep the flash call.
    short_segment_kernel: bool = False

    def _make_patch_embed(self, dim: int) -> PatchLinear:
        p = self.patch
        kernel = (p.in_channels, p.temporal_patch_size, p.patch_size, p.patch_size)
        return PatchLinear(dim, kernel)

    def compile_blocks(self) -> None:
        """Wraps both halves of every block in `torch.compile` (dynamic lengths), fusing
        norms, rotary and activations. GPU only; measure before enabling: on an H100 with
        a Qwen2.5-VL-3B tower it cut GPU time 2.3x (86 -> 38 ms for 10k patches), but
        the guards' CPU cost then bounded wall time (98 -> 101 ms); a 16k-patch video
        went 148 -> 85 ms."""
        for block in self.blocks:
            block.attention_inputs = torch.compile(block.attention_inputs, dynamic=True)
            block.residual_and_mlp = torch.compile(block.residual_and_mlp, dynamic=True)

    @abstractmethod
    def forward(self, patches: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """Runs the tower on packed patches [N, patch_dim]; returns [N / m^2, text_hidden]."""

    def _grid_of(self, item: MultiModalItem) -> Grid:
        if item.grid_thw is None:
            raise ValueError(f"item {item.content_hash} has no grid_thw")
        t, h, w = (int(n) for n in item.grid_thw)
        m = self.patch.spatial_merge_size
        if h % m or w % m:
            raise ValueError(f"grid {item.grid_thw} is not a multiple of the merge size {m}")
        expected = (t * h * w, self.patch.patch_dim)
        if tuple(item.pixel_values.shape) != expected:
            raise ValueError(
                f"item {item.content_hash}: pixel_values shape {tuple(item.pixel_values.shape)}, "
                f"expected {expected} for grid {item.grid_thw}"
            )
        if item.num_tokens != t * h * w // self.patch.merge_unit:
            raise ValueError(
                f"item {item.content_hash}: num_tokens {item.num_tokens} does not match grid "
                f"{item.grid_thw} (expected {t * h * w // self.patch.merge_unit})"
            )
        return (t, h, w)

    # no_grad rather than inference_mode: outputs are cached and handed to other processes,
    # and inference tensors refuse in-place ops (share_memory_, copies into) outside it.
    @torch.no_grad()
    def encode(self, items: Sequence[MultiModalItem]) -> list[torch.Tensor]:
        """Encodes images and videos in one forward: the patches of all items are
        concatenated, attention stays within each frame (or window) of each item.

        Args:
            items: items with `grid_thw` and pixel_values [t * h * w, C * T * P * P].

        Returns:
            Per item, [item.num_tokens, text_hidden_size] embeddings (views of one tensor).
        """
        if not items:
            return []
        grids = [self._grid_of(item) for item in items]
        # Pack on the host (a reused pinned buffer on GPU), then one transfer.
        if self._staging is None:
            self._staging = PinnedStaging()
        patches = stage_pixels(self._staging, items, self.device, self.dtype)  # [N, patch_dim]
        merged = self.forward(patches, grids)  # [sum num_tokens, text_hidden]
        return list(merged.split([item.num_tokens for item in items]))
