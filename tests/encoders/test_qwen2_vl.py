"""Qwen2-VL vision tower against HF's, in float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from encoders import build_vision_encoder
from encoders.qwen2_vl import Qwen2VLVisionEncoder
from processors.types import MultiModalItem
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

# Hub-layout vision_config (as Qwen2-VL-2B's config.json spells it: in_chans, no act).
HUB_VISION_CONFIG = {
    "depth": 2,
    "embed_dim": 32,
    "mlp_ratio": 2,
    "num_heads": 4,
    "in_chans": 3,
    "hidden_size": 24,
    "patch_size": PATCH,
    "spatial_merge_size": MERGE,
    "spatial_patch_size": PATCH,
    "temporal_patch_size": TEMPORAL,
}


@pytest.fixture(scope="module")
def hf_tower() -> Qwen2VisionTransformerPretrainedModel:
    vision = {
        k: v for k, v in HUB_VISION_CONFIG.items() if k not in ("in_chans", "spatial_patch_size")
    }
    config = Qwen2VLConfig(vision_config={**vision, "initializer_range": 0.1})
    tower = Qwen2VisionTransformerPretrainedModel(config.vision_config).eval()
    randomize_(tower, seed=1)
    return tower


@pytest.fixture(scope="module")
def encoder(hf_tower: Qwen2VisionTransformerPretrainedModel) -> Qwen2VLVisionEncoder:
    config = {"model_type": "qwen2_vl", "vision_config": HUB_VISION_CONFIG}
    enc = build_vision_encoder(
        config, qwen_hub_weights(hf_tower), torch.float32, torch.device("cpu")
    )
    assert isinstance(enc, Qwen2VLVisionEncoder)
    return enc


def test_one_image_matches_hf(hf_tower, encoder) -> None:
    item = qwen_item("a", (1, 6, 8), seed=0)
    (out,) = encoder.encode([item])
    (ref,) = qwen_hf_reference(hf_tower, [item])
    assert out.shape == (12, 24)
    assert_matches(out, ref)


def test_packed_images_of_different_sizes_match_hf_and_one_by_one(hf_tower, encoder) -> None:
    items = [
        qwen_item(f"i{n}", g, seed=n) for n, g in enumerate([(1, 6, 8), (1, 4, 4), (1, 10, 2)])
    ]
    packed = encoder.encode(items)
    alone = [encoder.encode([item])[0] for item in items]
    refs = qwen_hf_reference(hf_tower, items, one_by_one=True)
    for out, single, ref, item in zip(packed, alone, refs, items):
        assert out.shape == (item.num_tokens, encoder.text_hidden_size)
        assert_matches(out, ref)
        assert_matches(out, single)


def test_video_with_temporal_patches_matches_hf(hf_tower, encoder) -> None:
    # t = 3 temporal patches (6 frames): each temporal step is its own attention segment.
    items = [qwen_item("v", (3, 4, 6), seed=5, modality="video"), qwen_item("i", (1, 4, 4), seed=6)]
    outs = encoder.encode(items)
    refs = qwen_hf_reference(hf_tower, items)
    assert outs[0].shape == (18, 24)
    for out, ref in zip(outs, refs):
        assert_matches(out, ref)


def test_pixel_values_from_hf_fast_image_processor_match_hf(hf_tower, encoder) -> None:
    try:
        from transformers import Qwen2VLImageProcessorFast as Processor
    except ImportError:  # transformers >= 5.2x: the torchvision processor is the default
        from transformers import Qwen2VLImageProcessor as Processor
    processor = Processor(
        patch_size=PATCH,
        temporal_patch_size=TEMPORAL,
        merge_size=MERGE,
        size={"shortest_edge": 64, "longest_edge": 2048},
    )
    rng = np.random.RandomState(0)
    images = [
        Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8))
        for h, w in [(40, 24), (20, 36)]
    ]
    batch = processor(images=images, return_tensors="pt")
    grids = [tuple(g) for g in batch["image_grid_thw"].tolist()]
    pixels = batch["pixel_values"].split([t * h * w for t, h, w in grids])
    items = [
        MultiModalItem("image", f"p{n}", px, px.shape[0] // MERGE**2, g)
        for n, (px, g) in enumerate(zip(pixels, grids))
    ]
    with torch.no_grad():
        ref = hf_tower(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    ref = getattr(ref, "pooler_output", ref)
    assert_matches(torch.cat(encoder.encode(items)), ref)


def test_loads_transformers_v5_names_and_config(hf_tower) -> None:
    config = {"model_type": "qwen2_vl", "vision_config": hf_tower.config.to_dict()}
    enc = build_vision_encoder(
        config, qwen_v5_weights(hf_tower), torch.float32, torch.device("cpu")
    )
    item = qwen_item("a", (1, 4, 6), seed=3)
    (ref,) = qwen_hf_reference(hf_tower, [item])
    assert_matches(enc.encode([item])[0], ref)


def test_missing_and_unexpected_vision_weights_are_named(hf_tower) -> None:
    config = {"model_type": "qwen2_vl", "vision_config": HUB_VISION_CONFIG}
    weights = qwen_hub_weights(hf_tower)
    del weights["visual.blocks.1.mlp.fc2.bias"]
    weights["visual.blocks.7.attn.qkv.weight"] = torch.zeros(96, 32)
    with pytest.raises(ValueError) as err:
        build_vision_encoder(config, weights, torch.float32, torch.device("cpu"))
    assert "visual.blocks.1.mlp.fc2.bias" in str(err.value)
    assert "visual.blocks.7.attn.qkv.weight" in str(err.value)


def test_item_whose_shape_disagrees_with_its_grid_is_rejected(encoder) -> None:
    item = qwen_item("a", (1, 4, 4), seed=0)
    item.grid_thw = (1, 4, 6)
    with pytest.raises(ValueError, match="pixel_values shape"):
        encoder.encode([item])


def test_uint8_items_with_a_pixel_norm_encode_exactly_like_float_items(encoder) -> None:
    from encoders.staging import PinnedStaging, stage_pixels
    from processors.transforms import fused_norm

    norm = fused_norm(1 / 255, [0.5, 0.4, 0.3], [0.2, 0.3, 0.25], channel_axis=1)
    gen = torch.Generator().manual_seed(3)
    raw = [
        torch.randint(
            0, 256, (t * h * w, 3 * TEMPORAL * PATCH * PATCH), generator=gen, dtype=torch.uint8
        )
        for t, h, w in [(1, 6, 8), (1, 4, 4)]
    ]
    grids = [(1, 6, 8), (1, 4, 4)]
    as_uint8 = [
        MultiModalItem("image", f"u{n}", px, px.shape[0] // MERGE**2, g, pixel_norm=norm)
        for n, (px, g) in enumerate(zip(raw, grids))
    ]
    as_float = [
        MultiModalItem("image", f"f{n}", it.normalized_pixels(), it.num_tokens, it.grid_thw)
        for n, it in enumerate(as_uint8)
    ]
    staged = stage_pixels(PinnedStaging(), as_uint8, torch.device("cpu"), torch.float32)
    assert torch.equal(staged, torch.cat([it.pixel_values for it in as_float]))
    for ours, ref in zip(encoder.encode(as_uint8), encoder.encode(as_float)):
        assert torch.equal(ours, ref)
    # A mixed batch (one uint8, one float) is normalized per item on the host.
    mixed = encoder.encode([as_uint8[0], as_float[1]])
    assert torch.equal(mixed[0], encoder.encode([as_float[0]])[0])
