"""Qwen2.5-VL vision tower (window attention) against HF's, in float32."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
)

from encoders import build_vision_encoder
from encoders.qwen2_5_vl import Qwen2_5_VLVisionEncoder, window_order
from tests.encoders.reference import (
    MERGE,
    PATCH,
    TEMPORAL,
    assert_matches,
    qwen_hf_reference,
    qwen_hub_weights,
    qwen_item,
    qwen_v5_weights,
    randomize_,
)

torch.set_num_threads(1)

# Windows of 16 px = 4 x 4 patches = 2 x 2 merged tokens; blocks 1 and 3 attend fully.
HUB_VISION_CONFIG = {
    "depth": 4,
    "hidden_act": "silu",
    "hidden_size": 32,
    "intermediate_size": 40,
    "num_heads": 4,
    "in_chans": 3,
    "out_hidden_size": 24,
    "patch_size": PATCH,
    "spatial_merge_size": MERGE,
    "spatial_patch_size": PATCH,
    "window_size": 16,
    "fullatt_block_indexes": [1, 3],
    "tokens_per_second": 2,
    "temporal_patch_size": TEMPORAL,
}


@pytest.fixture(scope="module")
def hf_tower() -> Qwen2_5_VisionTransformerPretrainedModel:
    vision = {
        k: v for k, v in HUB_VISION_CONFIG.items() if k not in ("in_chans", "spatial_patch_size")
    }
    config = Qwen2_5_VLConfig(vision_config={**vision, "initializer_range": 0.1})
    tower = Qwen2_5_VisionTransformerPretrainedModel(config.vision_config).eval()
    randomize_(tower, seed=2)
    return tower


@pytest.fixture(scope="module")
def encoder(hf_tower) -> Qwen2_5_VLVisionEncoder:
    config = {"model_type": "qwen2_5_vl", "vision_config": HUB_VISION_CONFIG}
    enc = build_vision_encoder(
        config, qwen_hub_weights(hf_tower), torch.float32, torch.device("cpu")
    )
    assert isinstance(enc, Qwen2_5_VLVisionEncoder)
    return enc


def test_one_image_spanning_partial_windows_matches_hf(hf_tower, encoder) -> None:
    # 5 x 3 merged tokens: a 3 x 2 grid of 2 x 2 windows, the last row and column partial.
    item = qwen_item("a", (1, 10, 6), seed=0)
    (out,) = encoder.encode([item])
    (ref,) = qwen_hf_reference(hf_tower, [item])
    assert out.shape == (15, 24)
    assert_matches(out, ref)


def test_packed_images_match_hf_and_one_by_one(hf_tower, encoder) -> None:
    # Whole windows (8 x 8), partial ones (10 x 6, 2 x 14) and a sub-window image (2 x 2).
    grids = [(1, 8, 8), (1, 10, 6), (1, 2, 14), (1, 2, 2)]
    items = [qwen_item(f"i{n}", g, seed=n) for n, g in enumerate(grids)]
    packed = encoder.encode(items)
    alone = [encoder.encode([item])[0] for item in items]
    refs = qwen_hf_reference(hf_tower, items, one_by_one=True)
    packed_refs = qwen_hf_reference(hf_tower, items)
    for out, single, ref, packed_ref in zip(packed, alone, refs, packed_refs):
        assert_matches(out, ref)
        assert_matches(out, packed_ref)
        assert_matches(out, single)


def test_video_matches_hf(hf_tower, encoder) -> None:
    items = [
        qwen_item("v", (2, 6, 10), seed=7, modality="video"),
        qwen_item("i", (1, 4, 4), seed=8),
    ]
    outs = encoder.encode(items)
    refs = qwen_hf_reference(hf_tower, items)
    assert outs[0].shape == (30, 24)
    for out, ref in zip(outs, refs):
        assert_matches(out, ref)


def test_loads_transformers_v5_names_and_config(hf_tower) -> None:
    config = {"model_type": "qwen2_5_vl", "vision_config": hf_tower.config.to_dict()}
    enc = build_vision_encoder(
        config, qwen_v5_weights(hf_tower), torch.float32, torch.device("cpu")
    )
    item = qwen_item("a", (1, 6, 6), seed=3)
    (ref,) = qwen_hf_reference(hf_tower, [item])
    assert_matches(enc.encode([item])[0], ref)


def test_window_order_walks_windows_in_raster_order() -> None:
    # One 3 x 3 merged grid, windows of 2: [0 1 | 2], [3 4 | 5], [6 7 | 8].
    order, lengths = window_order([(1, 6, 6)], merge=2, window=2)
    assert order.tolist() == [0, 1, 3, 4, 2, 5, 6, 7, 8]
    assert lengths == [16, 8, 8, 4]  # patches per window (4 per merged token)


def test_gate_and_up_projections_are_required_separately(hf_tower) -> None:
    config = {"model_type": "qwen2_5_vl", "vision_config": HUB_VISION_CONFIG}
    weights = qwen_hub_weights(hf_tower)
    del weights["visual.blocks.2.mlp.up_proj.weight"]
    with pytest.raises(
        ValueError, match=r"missing vision weights: visual\.blocks\.2\.mlp\.up_proj"
    ):
        build_vision_encoder(config, weights, torch.float32, torch.device("cpu"))
