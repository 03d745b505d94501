"""Builds the vision encoder a checkpoint's config names and loads its weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from encoders.base import VisionEncoder
from encoders.llava import LlavaVisionConfig, LlavaVisionEncoder, llava_weight_layout
from encoders.qwen2_5_vl import QWEN2_5_VL_FUSED, Qwen2_5_VLVisionConfig, Qwen2_5_VLVisionEncoder
from encoders.qwen2_vl import Qwen2VLVisionConfig, Qwen2VLVisionEncoder, qwen_weight_layout
from encoders.weights import WeightLayout, build_on_device, load_weights

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "llava")


def build_vision_encoder(
    hf_config: dict[str, Any],
    weights: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> VisionEncoder:
    """Builds and loads the vision encoder of a HF-format checkpoint.

    Args:
        hf_config: the checkpoint's config.json as a dict (hub or transformers-5 layout);
            `model_type` picks the family, `vision_config` configures the tower.
        weights: checkpoint tensors by safetensors key; may hold the LLM's weights too
            (only this encoder's keys are read) and may be lazy.
        dtype: parameter dtype (float32 for tests, bfloat16 on GPU).
        device: where the encoder runs.

    Returns:
        The encoder in eval mode, every parameter loaded.

    Raises:
        ValueError: for an unsupported `model_type`, or missing / unexpected / misshapen
            vision weights (the error names them).
    """
    model_type = hf_config.get("model_type")
    vision_config = hf_config.get("vision_config") or {}
    encoder: VisionEncoder
    layout: WeightLayout
    if model_type == "qwen2_vl":
        cfg = Qwen2VLVisionConfig.from_hf(vision_config)
        encoder = build_on_device(lambda: Qwen2VLVisionEncoder(cfg), dtype, device)
        layout = qwen_weight_layout()
    elif model_type == "qwen2_5_vl":
        cfg25 = Qwen2_5_VLVisionConfig.from_hf(vision_config)
        encoder = build_on_device(lambda: Qwen2_5_VLVisionEncoder(cfg25), dtype, device)
        layout = qwen_weight_layout(QWEN2_5_VL_FUSED)
    elif model_type == "llava":
        cfg_llava = LlavaVisionConfig.from_hf(hf_config, weights)
        encoder = build_on_device(lambda: LlavaVisionEncoder(cfg_llava), dtype, device)
        layout = llava_weight_layout(encoder)
    else:
        raise ValueError(
            f"no vision encoder for model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
        )
    load_weights(encoder, weights, layout)
    return encoder.eval()
