"""CLIP vision transformer returning the hidden states of one or more chosen layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.layers import PatchLinear, get_activation


@dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of a CLIP `vision_config` the tower needs."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int  # square input side in pixels
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_hf(cls, vision_config: dict[str, Any]) -> CLIPVisionConfig:
        """Reads a CLIP `vision_config` dict; absent keys take HF's CLIPVisionConfig defaults
        (hub LLaVA configs omit e.g. `hidden_act`)."""
        return cls(
            hidden_size=vision_config.get("hidden_size", 768),
            intermediate_size=vision_config.get("intermediate_size", 3072),
            num_hidden_layers=vision_config.get("num_hidden_layers", 12),
            num_attention_heads=vision_config.get("num_attention_heads", 12),
            image_size=vision_config.get("image_size", 224),
            patch_size=vision_config.get("patch_size", 32),
            num_channels=vision_config.get("num_channels", 3),
            layer_norm_eps=vision_config.get("layer_norm_eps", 1e-5),
            hidden_act=vision_config.get("hidden_act", "quick_gelu"),
        )

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        kernel = (cfg.num_channels, cfg.patch_size, cfg.patch_size)
        self.patch_embedding = PatchLinear(cfg.hidden_size, kernel)
        self.position_embedding = nn.Embedding(cfg.grid**2 + 1, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [B, C, S, S] -> [B, 1 + (S / P)^2, hidden]
        b, c, _, _ = pixel_values.shape
        g, p = self.cfg.grid, self.cfg.patch_size
        patches = pixel_values.view(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(b, g * g, c * p * p)  # raster order, (C, P, P) per patch
        tokens = self.patch_embedding(patches)
        cls = self.class_embedding.expand(b, 1, -1)
        return torch.cat([cls, tokens], dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # fused at load
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, L, hidden]; qkv: [3, B, H, L, hd]
        qkv = self.qkv_proj(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, H, L, hd]
        return self.out_proj(out.transpose(1, 2).flatten(2))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


# Checkpoint tensors concatenated into one parameter at load.
CLIP_FUSED = {
    "qkv_proj.weight": ("q_proj.weight", "k_proj.weight", "v_proj.weight"),
    "qkv_proj.bias": ("q_proj.bias", "k_proj.bias", "v_proj.bias"),
}


class CLIPVisionTower(nn.Module):
    """CLIP's vision tower, truncated after the deepest layer any feature layer needs.

    Parameter names match the checkpoint's (`embeddings.*`, `pre_layrnorm.*`,
    `encoder.layers.N.*`) except the fused `self_attn.qkv_proj` (see CLIP_FUSED);
    `post_layernorm` is not built since LLaVA never reads the pooled output.
    """

    def __init__(self, cfg: CLIPVisionConfig, feature_layers: Sequence[int]) -> None:
        super().__init__()
        self.cfg = cfg
        # hidden_states[i] is the input of layer i (i = 0: embeddings after pre_layrnorm).
        num_states = cfg.num_hidden_layers + 1
        for layer in feature_layers:
            if not -num_states <= layer < num_states:
                raise ValueError(f"vision_feature_layer {layer} out of range for {num_states}")
        self.feature_layers = [layer % num_states for layer in feature_layers]
        self.num_layers_run = max(self.feature_layers)
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            CLIPEncoderLayer(cfg) for _ in range(self.num_layers_run)
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Returns the selected hidden states concatenated on the last dim,
        [B, 1 + (S / P)^2, hidden * len(feature_layers)]."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        selected = [states[i] for i in self.feature_layers]
        return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)

    def is_unused_weight(self, name: str) -> bool:
        """Whether a local checkpoint name is this tower's but deliberately not loaded."""
        if name.startswith("post_layernorm.") or name == "embeddings.position_ids":
            return True
        parts = name.split(".")
        if name.startswith("encoder.layers.") and parts[2].isdigit():
            return self.num_layers_run <= int(parts[2]) < self.cfg.num_hidden_layers
        return False
